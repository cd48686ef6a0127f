"""The one exception type that means "the user asked for something we cannot do", and
how to find one (or an S3 failure the user can fix) behind the errors Ray wraps it in."""


class UsageError(Exception):
    """Bad usage or bad input. The CLI prints the message as one line and exits 2.

    The message must say what is wrong and how to fix it.
    """


def find_usage_error(e: BaseException) -> UsageError | str | None:
    """A UsageError, or an S3 failure the user can fix, behind `e`: raised inside a Ray
    task, it arrives wrapped."""
    from deepfake_ray import storage

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UsageError):
            return e
        if explained := storage.explain(e):
            return explained
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None
