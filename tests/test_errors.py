"""ciphermq/errors.py: one place for every exception, one base class to catch them all."""
import importlib
import pkgutil

import ciphermq
from ciphermq import errors


def test_every_public_exception_is_defined_in_errors_under_the_base_class():
    """Every public exception class of the package is defined in errors.py and derives from
    CipherMQError; the old names (store.CorruptFile, checker.CheckError...) are the same class."""
    for info in pkgutil.iter_modules(ciphermq.__path__):
        module = importlib.import_module("ciphermq." + info.name)
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and not name.startswith("_") and value.__module__.startswith("ciphermq")):
                assert value.__module__ == "ciphermq.errors", "%s.%s" % (info.name, name)
                assert issubclass(value, errors.CipherMQError), name
    for module, name in (("store", "CorruptFile"), ("journal", "JournalError"),
                         ("transport", "TransportError"), ("chaos", "ChaosSpecError"),
                         ("checker", "CheckError")):
        old = getattr(importlib.import_module("ciphermq." + module), name)
        assert old is getattr(errors, name), "%s.%s" % (module, name)
    assert issubclass(errors.ChaosSpecError, ValueError), "argparse callers catch ValueError"
    assert issubclass(errors.KeyFileError, errors.UsageError)
