"""Hugging Face Hub ids where a checkpoint is taken: `stanfordnlp/backpack-gpt2`, `org/name@rev`.

Resolution goes through huggingface_hub, so its cache, environment (`HF_HOME`, `HF_HUB_OFFLINE`,
`HF_TOKEN`) and progress bars apply. Only the files a Backpack needs are fetched: config.json and
the first weights layout the repository has (safetensors, then its shard index, then `.bin`),
never the whole repository. No code from the repository runs: the config is read as JSON and the
weights as tensors (`.bin` with torch's `weights_only`).
"""

from __future__ import annotations

import json
import pathlib
import re

from backpack_jax.hf import files

# owner/name, as the Hub spells repository ids, then an optional @revision.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ValueError):
    """A Hub id that does not resolve to a Backpack; the message says what to do."""


def parse(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` is spelled like a Hub id, else None."""
    repo_id, at, revision = str(text).partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or (at and not revision):
        return None
    return repo_id, revision or None


def _download(repo_id: str, filename: str, revision: str | None) -> pathlib.Path | None:
    """The local path of one file of the repository, or None when the repository (or the cache,
    offline) has no such file. Other failures become one HubError line."""
    import huggingface_hub
    from huggingface_hub import errors

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, filename,
                                                            revision=revision))
    except errors.RemoteEntryNotFoundError:
        return None
    except errors.GatedRepoError:
        raise HubError(f"{where} is gated: accept its conditions on the Hub and log in "
                       "(`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such repository on the Hub, or it is private: check the "
                       "id, or log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no revision {revision!r} (a branch, tag "
                       "or commit)") from None
    except errors.LocalEntryNotFoundError:
        return None  # Not in the cache, and the Hub was not asked (offline) or not reachable.
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub refused {filename}: {str(e).splitlines()[0]}"
                       ) from None


def snapshot(repo_id: str, revision: str | None = None) -> pathlib.Path:
    """Fetches (or finds in the cache) config.json and the weights of a Backpack repository;
    returns the local snapshot directory holding them."""
    import huggingface_hub

    where = repo_id + (f"@{revision}" if revision else "")
    config_path = _download(repo_id, files.CONFIG_FILE, revision)
    if config_path is None:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise HubError(f"{where} is not in the Hugging Face cache "
                           f"({huggingface_hub.constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                           "set: download it once online, or unset HF_HUB_OFFLINE")
        raise HubError(f"{where}: no {files.CONFIG_FILE} could be had (not in the cache, and "
                       "the Hub has none or is not reachable)")
    config = json.loads(config_path.read_text())
    if "num_senses" not in config:
        raise HubError(f"{where} is not a Backpack: its {files.CONFIG_FILE} (model_type "
                       f"{config.get('model_type')!r}, architectures "
                       f"{config.get('architectures')}) has no num_senses")
    for name in files.WEIGHT_FILES:
        path = _download(repo_id, name, revision)
        if path is None:
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            for shard in shards:
                if _download(repo_id, shard, revision) is None:
                    raise HubError(f"{where}: shard {shard} named by {name} could not be had")
        return config_path.parent
    raise HubError(f"{where} has no weights that could be had: expected one of "
                   f"{', '.join(files.WEIGHT_FILES)}"
                   + (" in the cache (HF_HUB_OFFLINE is set)"
                      if huggingface_hub.constants.HF_HUB_OFFLINE else ""))
