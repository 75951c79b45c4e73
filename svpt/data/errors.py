"""The one exception type of svpt.data: bad paths, unreadable images, wrong split names."""


class DataError(ValueError):
    """Data that cannot be used as given; the message says what was wrong and what is accepted."""
