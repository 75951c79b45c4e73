"""Semantic segmentation with a prompted, frozen ViT: ADE20K-layout data, mmseg's training
pipeline, the SETR-PUP decoder of the VPT and CVPT papers (or a linear head), sliding-window
evaluation (mIoU, mAcc, aAcc) and a run directory with exact resume.

    import svpt.segmentation as seg
    result = seg.train(output="runs/shapes")                 # the built-in task, seconds on a CPU
    result = seg.train(seg.SegmentationConfig(model="vit_large_patch16_384", weights="L_16.npz",
                                              data="ADEChallengeData2016", method="svpt", num_prompts=50,
                                              output="runs/ade-svpt"))
    scores = seg.evaluate("runs/ade-svpt", multi_scale=True, flip=True)
"""
from .data import ADE20K_CLASSES, BUILTIN_CLASSES, IGNORE_INDEX, ADE20KFolder, GeneratedShapes, LabelledImage, open_split
from .decoders import DECODERS, LinearHead, SETRUPHead
from .inference import MULTI_SCALE_RATIOS, ConfusionMatrix, TestPipeline, slide_logits, windows
from .model import (SegmentationModel, default_out_indices, is_segmentation_checkpoint, load_checkpoint,
                    read_checkpoint, save_checkpoint)
from .run import SegmentationConfig, build_model, evaluate, evaluate_model, is_segmentation_run, train
from .transforms import TrainPipeline

__all__ = [
    "ADE20KFolder", "ADE20K_CLASSES", "BUILTIN_CLASSES", "ConfusionMatrix", "DECODERS", "GeneratedShapes",
    "IGNORE_INDEX", "LabelledImage", "LinearHead", "MULTI_SCALE_RATIOS", "SETRUPHead", "SegmentationConfig",
    "SegmentationModel", "TestPipeline", "TrainPipeline", "build_model", "default_out_indices", "evaluate",
    "evaluate_model", "is_segmentation_checkpoint", "is_segmentation_run", "load_checkpoint", "open_split",
    "read_checkpoint", "save_checkpoint", "slide_logits", "train", "windows",
]
