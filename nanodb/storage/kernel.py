"""The C search kernel (nanodb/storage/_scan.c), loaded with ctypes only when it matches this code.

The package's install builds `_scan` beside this module. A library built from another `_scan.c` (an
old build left in place, a copy from another checkout) may lack a function or have other signatures:
calling it would crash, and setting its signatures already fails on a missing symbol. So the library
must report the ABI version this module was written for (`nanodb_kernel_abi`), and any mismatch,
missing function or load error leaves search on its portable NumPy/BLAS pass, with one warning line.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
from pathlib import Path

log = logging.getLogger(__name__)

KERNEL_ABI = 3  # NANODB_KERNEL_ABI in _scan.c: bump both with any change of its functions

_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {  # name: (argument types, result type)
    "nanodb_scores": ([_P, _P, _I, _I, _P, _P, _P, _I, _P, _I], None),
    "nanodb_scores_rows": ([_P, _P, _P, _I, _I, _P, _P, _P, _I, _P, _I], None),
    "nanodb_scores_level": ([_I, _P, _P, _P, _I, _I, _P, _P, _P, _I, _P, _I], None),
    "nanodb_level": ([_I], ctypes.c_int),
    "nanodb_dots": ([_P, _P, _I, _I, _P, _P, _P], None),
    "nanodb_dots_ok": ([_I], ctypes.c_int),
}


def load_kernel(path: Path) -> ctypes.CDLL | None:
    """The kernel library at `path` with its signatures set, or None (one warning logged) when it cannot
    be loaded, reports another ABI version than KERNEL_ABI, or lacks one of SIGNATURES' functions."""
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.nanodb_kernel_abi
        abi.argtypes, abi.restype = [], ctypes.c_int
        found = abi()
        if found != KERNEL_ABI:
            problem = f"it was built for kernel ABI {found}, this nanodb needs {KERNEL_ABI}"
        else:
            for name, (argtypes, restype) in SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = argtypes, restype
            return lib
    except (OSError, AttributeError) as e:  # AttributeError: a missing function (undefined symbol)
        problem = str(e)
    log.warning("cannot use the search kernel %s (%s): searching with the float16 BLAS pass; rebuild it "
                "with ./run.sh or pip install -e .", path, problem)
    return None


def built_kernel(folder: Path = Path(__file__).resolve().parent) -> ctypes.CDLL | None:
    """The kernel the package's install built in `folder`, beside this module (see load_kernel); None,
    silently, when none was built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_scan{suffix}"
        if path.exists():
            return load_kernel(path)
    return None
