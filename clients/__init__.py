"""The Python client of the Soft Specialists gateway (built on the official ``openai`` SDK).

Everything public lives in :mod:`clients.softspec_client`; its ``__all__`` is the package's.
"""

from clients.softspec_client import *  # noqa: F403
from clients.softspec_client import __all__ as __all__
