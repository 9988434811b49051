"""spandrel without torchvision: the one place that imports spandrel and spandrel_extra_arches.

spandrel 0.4.2 declares torchvision and imports it at `import spandrel`, for two architectures only:
LaMa (`torchvision.transforms.functional.rotate`) and RestoreFormer (`...functional.normalize`).
We never install torchvision (the index's build is a CUDA build that breaks beside the CPU torch,
and transformers then fails on missing torchvision ops), so the installer puts spandrel in with
`--no-deps` (tools/install_requirements.py, docs/architecture.md "spandrel without torchvision").

When torchvision is absent, `import spandrel` runs with a stand-in `torchvision` module whose
functions raise, and the stand-in is taken out of `sys.modules` again at once, so no other library
(transformers checks `find_spec("torchvision")`) ever sees it. Our registry leaves LaMa and
RestoreFormer out and reports them as unavailable. Where a user has a working torchvision, nothing is
stubbed and every architecture is available.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

NEEDS_TORCHVISION = ("LaMa", "RestoreFormer")
_STUB_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_lock = threading.Lock()
_support: "SpandrelSupport | None" = None


@dataclass
class SpandrelSupport:
    spandrel: Any                        # the spandrel module
    registry: Any                        # spandrel.ArchRegistry: what we detect with
    unavailable: dict[str, str] = field(default_factory=dict)   # arch id -> why not

    def model_loader(self) -> Any:
        return self.spandrel.ModelLoader(device="cpu", registry=self.registry)


def _unavailable(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("this architecture needs torchvision, which this install does not have")


def _stub_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _STUB_NAMES}
    functional = mods["torchvision.transforms.functional"]
    functional.rotate = functional.normalize = _unavailable
    functional.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest")
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = functional
    return mods


def _import_spandrel(stub: bool) -> Any:
    if not stub:
        import spandrel
        return spandrel
    stubs = _stub_modules()
    saved = {name: sys.modules.get(name) for name in _STUB_NAMES}
    sys.modules.update(stubs)
    try:
        import spandrel
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return spandrel


def _build() -> SpandrelSupport:
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    spandrel = _import_spandrel(stub=not has_torchvision)
    registry = spandrel.ArchRegistry()
    unavailable: dict[str, str] = {}
    for arch in spandrel.MAIN_REGISTRY:
        arch_id = str(arch.architecture.id)
        if not has_torchvision and arch_id in NEEDS_TORCHVISION:
            unavailable[arch_id] = "needs torchvision, which is not installed"
            continue
        registry.add(arch)
    try:
        import spandrel_extra_arches
    except ImportError:
        unavailable["CodeFormer"] = "spandrel_extra_arches is not installed"
    else:
        # Extra arches (CodeFormer, ...) carry non-commercial licences; see docs/architecture.md.
        registry.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    return SpandrelSupport(spandrel=spandrel, registry=registry, unavailable=unavailable)


def spandrel_support() -> SpandrelSupport:
    """spandrel, our architecture registry and what is unavailable; built once per process."""
    global _support
    with _lock:
        if _support is None:
            _support = _build()
        return _support
