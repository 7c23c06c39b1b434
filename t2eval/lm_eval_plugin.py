"""Make `lm_eval --model t2` work from lm-eval's stock CLI.

lm-eval 0.4.13 has no plugin discovery: its model registry only knows the names listed in
`lm_eval/models/__init__.py` (package entry points are never read, and `--include_path` only
loads task YAMLs). Three ways in, from lightest to most automatic:

1. In Python: `import t2eval.lm` (registers "t2"), then `lm_eval.simple_evaluate(model="t2", ...)`.
2. `t2eval-lm-eval ...` / `python -m t2eval.lm_eval_plugin run ...`: the stock CLI with "t2" registered.
3. `python -m t2eval.lm_eval_plugin install`: writes `t2eval-lm-eval.pth` into site-packages; at
   interpreter start it adds an import hook that, when lm-eval's registry module is first imported,
   registers "t2" as a lazy placeholder (`t2eval.lm:T2LM`). Nothing heavy is imported at start-up, and
   the stock `lm_eval --model t2 ...` command then works. `uninstall` removes the file.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

MODEL_NAME = "t2"
TARGET = "t2eval.lm:T2LM"
PTH_NAME = "t2eval-lm-eval.pth"
_REGISTRY_MODULE = "lm_eval.api.registry"


def register() -> None:
    """Register "t2" in lm-eval's model registry as a lazy placeholder (idempotent)."""
    import lm_eval.models  # noqa: F401  (registers the stock names first: get_model needs them)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            # the stock names first: lm-eval fills its registry lazily only while it is empty, so
            # registering "t2" alone would hide "hf", "vllm", ... from get_model()
            import lm_eval.models  # noqa: F401

            if MODEL_NAME not in module.model_registry:
                module.model_registry.register(MODEL_NAME, target=TARGET)
        except Exception:  # never break lm-eval's own import
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec, then hook its loader once
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            pass
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def hook() -> None:
    """Called from the .pth file at interpreter start: cheap, imports nothing from lm-eval."""
    if _REGISTRY_MODULE in sys.modules:
        try:
            register()
        except Exception:
            pass
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def pth_path(site_dir: str | Path | None = None) -> Path:
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install(site_dir: str | Path | None = None) -> Path:
    p = pth_path(site_dir)
    p.write_text("import t2eval.lm_eval_plugin as _t2p; _t2p.hook()\n")
    return p


def uninstall(site_dir: str | Path | None = None) -> bool:
    p = pth_path(site_dir)
    if p.exists():
        p.unlink()
        return True
    return False


def run_cli(argv: list[str] | None = None) -> int:
    """lm-eval's stock command line with "t2" registered (console script `t2eval-lm-eval`)."""
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    return cli_evaluate() or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else "help"
    if cmd == "install":
        print(f"wrote {install(argv[1] if len(argv) > 1 else None)}: `lm_eval --model t2` now works")
        return 0
    if cmd == "uninstall":
        print("removed" if uninstall(argv[1] if len(argv) > 1 else None) else "nothing to remove")
        return 0
    if cmd == "run":
        return run_cli(argv[1:])
    print(__doc__)
    return 0 if cmd == "help" else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
