"""Hub models: download via huggingface_hub when reachable, otherwise a clear, actionable error."""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingModelError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def _offline_error(hub_id: str, key: str, why: str) -> MissingModelError:
    return MissingModelError(
        f"model {hub_id} ({key}) is not in the local Hugging Face cache and the hub could not be reached "
        f"({why}).\n  Either: download it on a machine with access (`huggingface-cli download {hub_id}`) "
        f"and copy the directory here, then pass it as the model (`t2eval prepare-model /path/to/dir --out models/{key}` "
        f"or set `models: {{{key}: /path/to/dir}}` in the workflow config);\n  or: log in / set HF_TOKEN "
        f"if the repository is gated, and make sure the hub is reachable.")


def fetch(hub_id: str, key: str, out: str | Path | None = None) -> Path:
    """Return a local directory for `hub_id`: the HF cache first, then a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    kw = {"allow_patterns": WEIGHT_PATTERNS}
    if out is not None:
        kw["local_dir"] = str(out)
    try:
        return Path(snapshot_download(hub_id, local_files_only=True, **kw))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(hub_id, etag_timeout=10, **kw))
    except GatedRepoError as e:
        raise MissingModelError(f"model {hub_id} is gated: accept its licence on the hub and set HF_TOKEN "
                                f"({type(e).__name__})") from None
    except RepositoryNotFoundError:
        raise MissingModelError(f"model {hub_id} does not exist on the hub (or needs a token)") from None
    except Exception as e:  # connection errors come in many types (httpx, requests, OSError)
        raise _offline_error(hub_id, key, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
