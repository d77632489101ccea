"""Course chapters; importing this package registers every chapter's models.

Every subpackage is imported, so a new chapter registers itself by existing (no list to edit)."""

import importlib
import pkgutil

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")
