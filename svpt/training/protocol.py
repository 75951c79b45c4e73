"""The three protocols a run follows, which splits each reads, and what it reports.

* ``tune`` (VPT's hyper-parameter search): train on the tuning split (VTAB-1k ``train800``),
  evaluate the validation split (``val200``) after every epoch; the result is the validation
  accuracy after the last epoch (the number VPT's ``tune_vtab.py`` compares). The test
  split is never read.
* ``final`` (VPT's reported run): train on train + val (``train800val200``), evaluate the
  test split once, after the last epoch; that accuracy is the result. Nothing is selected.
* ``max-test`` (opt-in; the tables of NOAH-lineage code): train as ``final``, evaluate the
  test split after every epoch and report the maximum over epochs. That is model selection
  on the test set, and every output that carries it says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data import DataError, DataSource

PROTOCOLS = ("tune", "final", "max-test")


@dataclass(frozen=True)
class Plan:
    protocol: str
    train_split: str
    eval_split: str

    @property
    def evaluates_every_epoch(self) -> bool:
        """And keeps the best epoch's prompts (best on val for tune, on test for max-test)."""
        return self.protocol != "final"

    @property
    def best_file(self) -> str:
        return "prompts_best_val.safetensors" if self.protocol == "tune" else "prompts_best_test.safetensors"

    def describe(self) -> str:
        t, e = self.train_split, self.eval_split
        if self.protocol == "tune":
            return (f"protocol tune (VPT's hyper-parameter search): train on {t}, evaluate {e} after every epoch; "
                    f"result: {e} accuracy after the last epoch; the test split is never read")
        if self.protocol == "final":
            return (f"protocol final (VPT): train on {t}, evaluate {e} once, after the last epoch; result: that "
                    "accuracy, with no selection over epochs")
        return (f"protocol max-test (opt-in, as NOAH-lineage tables): train on {t}, evaluate {e} after every epoch; "
                f"result: the MAXIMUM {e} accuracy over epochs, i.e. model selection on the test set, "
                "not VPT's protocol")

    def result_metric(self, epoch: int, epochs: int) -> str:
        """What the reported accuracy is, in words."""
        if self.protocol == "max-test":
            return (f"max over epochs of {self.eval_split} accuracy (epoch {epoch} of {epochs}; "
                    "selected on the test set)")
        return f"{self.eval_split} accuracy after the last epoch ({epochs})"


def _missing(protocol: str, source: DataSource) -> DataError:
    needs = ("a validation split (VTAB-1k val200.txt, FGVC val.json, an image folder's val/)" if protocol == "tune"
             else "a test split (VTAB-1k test.txt, FGVC test.json, an image folder's test/)")
    return DataError(f"--protocol {protocol} needs {needs}; {source.describe()} has none; give --train-split "
                     f"and --eval-split, or {'another protocol' if protocol == 'tune' else '--protocol tune'}")


def default_protocol(source: DataSource) -> str:
    """``final`` where the data has a test split, else ``tune``."""
    return "final" if source.final_splits else "tune"


def make_plan(source: DataSource, protocol: str | None, train_split: str | None = None,
              eval_split: str | None = None) -> Plan:
    """The splits of a run; ``train_split`` / ``eval_split`` replace the protocol's own. A
    tuning run never evaluates the test split, no run trains on it, and the evaluation
    split is never part of the training split."""
    protocol = protocol or default_protocol(source)
    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol {protocol!r} is not accepted; accepted: {', '.join(PROTOCOLS)}")
    own = source.tune_splits if protocol == "tune" else source.final_splits
    if own is None and not (train_split and eval_split):
        raise _missing(protocol, source)
    train = source.check_split(train_split or own[0], "--train-split")
    evaluated = source.check_split(eval_split or own[1], "--eval-split")
    test = source.test_split
    if test and test in source.parts(train):
        raise DataError(f"--train-split {train!r} contains the test split {test!r}; no protocol trains on it")
    if protocol == "tune" and test and test in source.parts(evaluated):
        raise DataError(f"--protocol tune never reads the test split, and --eval-split {evaluated!r} is it: "
                        "selecting on it would be selection on the test set; --protocol max-test is the "
                        "explicit opt-in for that")
    overlap = source.parts(train) & source.parts(evaluated)
    if overlap:
        raise DataError(f"--eval-split {evaluated!r} overlaps the training split {train!r} "
                        f"(both hold {', '.join(sorted(overlap))})")
    return Plan(protocol, train, evaluated)
