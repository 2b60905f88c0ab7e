"""Helpers for reading exceptions that arrive wrapped (a library error raised ``from`` another), and the fix for
an object-store request that never reached the store."""
from __future__ import annotations

from typing import Iterator


def exception_chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e``, then its ``__cause__`` (or ``__context__``), and so on; each exception once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def storage_cause(e: BaseException) -> BaseException | None:
    """The botocore/boto3 error behind ``e`` (itself, its cause or context), or None."""
    try:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency of mosaicml-streaming
        return None
    return next((c for c in exception_chain(e) if isinstance(c, (BotoCoreError, ClientError, Boto3Error))), None)


def unreached_fix(cause: BaseException | None, setting: str, retry: str) -> str | None:
    """The fix for a request that never reached the store: no credentials, or an endpoint that does not answer
    (``setting`` names where the endpoint is set, ``retry`` what to do then); None for any other error."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import NoCredentialsError
    if isinstance(cause, NoCredentialsError):
        return (f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and {setting} for a store other "
                f"than AWS S3")
    if isinstance(cause, BotoConnectionError):
        return f"check that the endpoint is up and reachable from here ({setting}){retry}"
    return None
