"""Load openai-whisper next to our own `whisper` package, in .venv-ref only.

Both projects name their top-level package `whisper`. We keep `import whisper` for ours
(the repo root goes first on sys.path) and load OpenAI's package from site-packages
under the name `openai_whisper`. OpenAI's modules import each other relatively only, so
they register as `openai_whisper.audio`, `openai_whisper.decoding`, ... and never
resolve to ours. Import this module before anything imports `whisper`.

torch is imported before our package on purpose: ours preloads the system OpenBLAS
globally for MLX, and loading torch first keeps torch's own BLAS symbols its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load_openai_whisper() -> ModuleType:
    if "openai_whisper" in sys.modules:
        return sys.modules["openai_whisper"]
    package_dir = Path(sysconfig.get_paths()["purelib"]) / "whisper"
    if not (package_dir / "decoding.py").exists():
        raise SystemExit(
            f"openai-whisper is not installed in {sys.prefix}: run scripts/reference_env.sh "
            "and use .venv-ref/bin/python"
        )
    spec = importlib.util.spec_from_file_location(
        "openai_whisper", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["openai_whisper"] = module
    spec.loader.exec_module(module)
    return module


openai_whisper = _load_openai_whisper()
# Ours first; tests/ gives the shared clip list and WER (tests/speech.py).
for _path in (str(REPO / "tests"), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
if "whisper" in sys.modules and not sys.modules["whisper"].__file__.startswith(str(REPO)):
    raise SystemExit("another `whisper` package was imported before tests/reference/openai_ref.py")


def openai_model_from_ours(name: str):
    """openai-whisper's PyTorch model (fp32, CPU) holding exactly our engine's weights.

    The names and layouts are mapped by `checkpoint_files.openai_state_dict`; the encoder's
    sinusoidal positions are the torch model's own. Alignment heads come from openai-whisper's
    table for the same checkpoint name.
    """
    import torch
    from checkpoint_files import openai_state_dict

    from whisper.convert import load_ct2
    from whisper.models import bundled_model_dir

    dims, weights = load_ct2(bundled_model_dir(name))
    model = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**dataclasses.asdict(dims)))
    state = {key: torch.tensor(value) for key, value in openai_state_dict(dims, weights).items()}
    state["encoder.positional_embedding"] = model.encoder.positional_embedding
    model.load_state_dict(state, strict=True)
    model.set_alignment_heads(openai_whisper._ALIGNMENT_HEADS[name])
    return model.float().eval()
