"""Models on the Hugging Face Hub by id: what training needs, fetched into the standard HF cache through
huggingface_hub (progress per file, the disk checked first), a complete cached snapshot found offline, Hub search,
and the Hub's failures (gated, not found, wrong revision, offline, disk full) as EngineErrors.

Not here: listing what the cache holds (local_models.py). Tokens are huggingface_hub's own (HF_TOKEN or what
`hf auth login` stored); they are never logged or put in an event.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.errors import EngineError, write_failure
from qlora_engine.protocol.model_ref import HubRef
from qlora_engine.protocol.queries import HubModel, HubToken

# Everything from_pretrained needs for a causal LM and its tokenizer; weights are picked separately.
TRAINING_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json"})
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
DISK_MARGIN_BYTES = 256 * 2**20  # left free after a download: a disk filled to the last byte breaks other programs
PROGRESS_INTERVAL_S = 0.25
TOKEN_ADVICE = "give a token: set HF_TOKEN, run `hf auth login`, or paste one on the Model page"
# huggingface_hub's shared client waits for an answer without limit: a Hub (or proxy) that takes the connection and
# never answers would hold a pull, a search or a run's start forever. Each wait for the Hub ends after this.
HUB_TIMEOUT_S = float(os.environ.get("QLORA_STUDIO_HUB_TIMEOUT_S") or 20.0)


def _with_time_limit() -> None:
    """Give every request of huggingface_hub's shared client (made anew after a fork or a close) that has no time
    limit one: its model_info and list_models pass `timeout=None` (no limit) explicitly, so the client's own default
    is not enough; the transports (proxies' too) fill the limit in. Requests with a limit keep theirs."""
    from huggingface_hub import get_session

    client = get_session()
    if not getattr(client._transport, "time_limited", False):
        limited = _time_limited_transport()
        client._transport = limited(client._transport)
        client._mounts = {pattern: limited(transport) if transport is not None else None
                          for pattern, transport in client._mounts.items()}


def _time_limited_transport() -> type:
    import httpx2

    class TimeLimited(httpx2.BaseTransport):
        time_limited = True

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def handle_request(self, request: Any) -> Any:
            limits = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {key: HUB_TIMEOUT_S if limits.get(key) is None else limits[key]
                                             for key in ("connect", "read", "write", "pool")}
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    return TimeLimited

Progress = Callable[[ev.Event], Any]


def hf_cache_dir() -> Path:
    """The standard HF cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), as huggingface_hub
    resolved it when first imported."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


# ----------------------------------------------------------------------------- which files
def training_files(names: list[str], allow_pickle: bool, index: dict[str, Any] | None = None) -> list[str]:
    """The repo files training needs: config, tokenizer, chat template, generation config and the weights.

    Weights are the shards the index names, else model.safetensors (or every top-level .safetensors but a
    consolidated.* copy); pickle .bin only with allow_pickle and no safetensors. Subfolders (original/, onnx/, …)
    are never fetched.
    """
    top = [name for name in names if "/" not in name]
    chosen = {name for name in top if name in TRAINING_FILES}
    if index is not None:
        return sorted(chosen | {SAFETENSORS_INDEX if SAFETENSORS_INDEX in top else PICKLE_INDEX}
                      | set(index.get("weight_map", {}).values()))
    weights = [name for name in top if name.endswith(".safetensors")]
    if "model.safetensors" in weights:
        weights = ["model.safetensors"]
    weights = [name for name in weights if not name.startswith("consolidated")] or weights
    if not weights and allow_pickle:
        weights = [name for name in top if name.endswith(".bin") and name != "training_args.bin"]
    return sorted(chosen | set(weights))


def index_file(names: list[str], allow_pickle: bool) -> str | None:
    """The weight index to read before choosing shards, if the repo has one we would use."""
    if SAFETENSORS_INDEX in names:
        return SAFETENSORS_INDEX
    has_safetensors = any(name.endswith(".safetensors") for name in names if "/" not in name)
    return PICKLE_INDEX if allow_pickle and not has_safetensors and PICKLE_INDEX in names else None


def snapshot_is_complete(folder: Path, allow_pickle: bool = False) -> bool:
    """config.json and every weight file there (those the index names, else at least one). Files enter a snapshot
    only when whole (huggingface_hub renames a finished download into place), so a present file is a complete one."""
    if not (folder / "config.json").is_file():
        return False
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX if allow_pickle else None):
        if index_name and (folder / index_name).is_file():
            shards = set(json.loads((folder / index_name).read_text(encoding="utf-8")).get("weight_map", {}).values())
            return bool(shards) and all((folder / shard).is_file() for shard in shards)
    suffixes = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
    return any(path.name.endswith(suffixes) and path.is_file() for path in folder.iterdir())


def cached_snapshot(ref: HubRef, cache_dir: Path | None = None, allow_pickle: bool = False) -> tuple[str, Path] | None:
    """(commit, folder) of the revision's complete snapshot in the HF cache, without the network; None if absent."""
    from huggingface_hub.file_download import repo_folder_name

    storage = (cache_dir or hf_cache_dir()) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    revision = ref.revision_or_main
    commit = revision
    ref_file = storage / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
    folder = storage / "snapshots" / commit
    return (commit, folder) if folder.is_dir() and snapshot_is_complete(folder, allow_pickle) else None


# ----------------------------------------------------------------------------- the Hub's failures
def hub_error(exc: BaseException, ref: HubRef, cache_dir: Path | None = None) -> EngineError | None:
    """A huggingface_hub failure as the error a person can act on; None when `exc` is not one of them."""
    import httpx2
    from huggingface_hub import errors

    url = ref.page_url
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    request = getattr(response, "request", None)
    if status == 401 and request is not None and request.headers.get("authorization") \
            and "Invalid credentials" in str(exc):
        return EngineError("bad_token", f"the Hub refused the token sent for {ref.repo_id} (HTTP 401: it is invalid, "
                           "expired or revoked)", f"Make a new token on {TOKEN_PAGE} ('Read' is enough), then "
                           f"{TOKEN_ADVICE}.")
    if isinstance(exc, errors.GatedRepoError) or (status == 403 and isinstance(exc, errors.HfHubHTTPError)):
        return EngineError("gated_model", f"{ref.repo_id} is gated (the Hub answered {status}): its license must be "
                           f"accepted on {url} before it can be downloaded",
                           f"Open {url}, accept the license with your Hugging Face account, then {TOKEN_ADVICE}. "
                           "A fine-grained token needs 'read access to public gated repos'.")
    if isinstance(exc, errors.RevisionNotFoundError):
        return EngineError("revision_not_found", f"{ref.repo_id} has no revision '{ref.revision_or_main}'",
                           f"Pick a branch, tag or commit listed on {url}/tree/main (or leave @revision out).")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return EngineError("model_not_found", f"there is no model {ref.repo_id} on the Hub (or it is private)",
                           f"Check the id's spelling on https://huggingface.co/models; for a private model, "
                           f"{TOKEN_ADVICE}.")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return EngineError("model_not_found", f"{ref.repo_id}: a file it lists is missing on the Hub ({exc})",
                           "Try again later, or pick another revision of the model.")
    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, httpx2.ConnectError,
                        httpx2.TimeoutException, httpx2.RemoteProtocolError)):
        why = "HF_HUB_OFFLINE is set" if is_offline() else "the Hub can't be reached"
        return EngineError("offline", f"{ref} is not complete in the HF cache and {why}",
                           f"Connect to the internet (or unset HF_HUB_OFFLINE) and download it: qlora-studio pull "
                           f"{ref}. Models already downloaded load offline.")
    if isinstance(exc, errors.HfHubHTTPError):
        return EngineError("hub_error", f"the Hub refused {ref} (HTTP {status}): {str(exc).splitlines()[0]}",
                           "Try again later; if it persists, check https://status.huggingface.co.")
    if isinstance(exc, OSError):
        return write_failure(exc, f"{ref} into the HF cache", cache_dir or hf_cache_dir(),
                             f"run the download again (qlora-studio pull {ref}): files already complete are kept")
    return None


@contextmanager
def hub_errors(ref: HubRef, cache_dir: Path | None = None) -> Iterator[None]:
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:  # huggingface_hub raises httpx, OSError and its own types; the rest are bugs
        translated = hub_error(exc, ref, cache_dir)
        if translated is None:
            raise
        raise translated from exc


# ----------------------------------------------------------------------------- downloading
class _FileProgress:
    """What huggingface_hub's download loop calls a tqdm: turned into throttled DownloadProgress events."""

    def __init__(self, report: Callable[[int, bool], None], initial: int = 0, **_: Any) -> None:
        self.report, self.n = report, int(initial or 0)  # initial: the bytes a resumed download already has
        self.report(self.n, False)  # the file has started: a client shows which one is on its way

    def __enter__(self) -> _FileProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.report(self.n, True)

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        self.report(self.n, False)

    def close(self) -> None:
        pass


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 2**62


def check_disk_space(needed_bytes: int, folder: Path, what: str) -> None:
    free = _free_bytes(folder)
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise EngineError("disk_full", f"{what} needs {needed_bytes / 2**30:.2f} GiB but {folder} has "
                          f"{free / 2**30:.2f} GiB free", "Free some disk space, or put the HF cache on a drive with "
                          "room (set HF_HUB_CACHE or HF_HOME), then download again.")


def pull(ref: HubRef, *, allow_pickle: bool = False, on_progress: Progress | None = None,
         cache_dir: Path | None = None, endpoint: str | None = None, token: str | None = None) -> ev.Downloaded:
    """Fetch what training needs of `ref` into the HF cache (files already there are not fetched again); offline,
    or when the Hub can't be reached, a complete cached snapshot is used instead."""
    cache_dir = cache_dir or hf_cache_dir()
    if is_offline():
        return _cached_or_raise(ref, cache_dir, allow_pickle, None)
    try:
        with hub_errors(ref, cache_dir):
            return _download(ref, allow_pickle, on_progress or (lambda event: None), cache_dir, endpoint, token)
    except EngineError as exc:
        if exc.code != "offline":
            raise
        return _cached_or_raise(ref, cache_dir, allow_pickle, exc)


def _cached_or_raise(ref: HubRef, cache_dir: Path, allow_pickle: bool, error: EngineError | None) -> ev.Downloaded:
    found = cached_snapshot(ref, cache_dir, allow_pickle)
    if found is None:
        with hub_errors(ref, cache_dir):
            from huggingface_hub.errors import OfflineModeIsEnabled

            raise error or OfflineModeIsEnabled(f"{ref} is not in the HF cache")
    commit, folder = found
    files = sorted(path.name for path in folder.iterdir())
    return ev.Downloaded(repo_id=ref.repo_id, revision=ref.revision_or_main, commit=commit, path=str(folder),
                         files=files, downloaded_bytes=0, total_bytes=sum((folder / f).stat().st_size for f in files))


@dataclass(frozen=True)
class RemoteModel:
    """What the Hub holds of a revision: its commit, every file's size, the files training needs, and the snapshot
    folder in the HF cache (config.json is in it already)."""

    commit: str
    sizes: dict[str, int]
    names: list[str]
    folder: Path

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.get(name, 0) for name in self.names)


def _fetch(ref: HubRef, name: str, revision: str, cache_dir: Path, endpoint: str | None, token: str | None,
           progress: Any = None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref.repo_id, name, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                token=token, tqdm_class=progress))


def remote_model(ref: HubRef, allow_pickle: bool, cache_dir: Path, endpoint: str | None = None,
                 token: str | None = None) -> RemoteModel:
    """The Hub's file list for `ref` and the training files chosen from it; fetches config.json (and the weight
    index, a few KB) but no weights. A repo without config.json or without safetensors is refused here."""
    from huggingface_hub import HfApi

    _with_time_limit()
    info = HfApi(endpoint=endpoint, token=token).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    if "config.json" not in sizes:
        ggufs = [name for name in sizes if name.endswith(".gguf")]
        raise EngineError("unsupported_model", f"{ref} has no config.json: it is not a transformers model folder"
                          + (" (it holds .gguf files)" if ggufs else ""),
                          "Download one of its .gguf files and pick that file instead." if ggufs
                          else f"Pick a model whose files on {ref.page_url} include config.json and *.safetensors.")
    # config.json first, by the revision asked for: this also records refs/<branch> for offline use by id.
    folder = _fetch(ref, "config.json", ref.revision_or_main, cache_dir, endpoint, token).parent
    index_name = index_file(list(sizes), allow_pickle)
    index = (json.loads(_fetch(ref, index_name, info.sha, cache_dir, endpoint, token).read_text(encoding="utf-8"))
             if index_name else None)
    names = training_files(list(sizes), allow_pickle, index)
    if not any(name.endswith((".safetensors", ".bin")) for name in names):
        pickles = [name for name in sizes if name.endswith((".bin", ".pt", ".pth"))]
        advice = ("Pickle files can run code when loaded: set allow_pickle: true only if you trust the model's "
                  "author." if pickles else f"Pick a model whose files on {ref.page_url} include *.safetensors.")
        raise EngineError("pickle_refused" if pickles else "unsupported_model",
                          f"{ref} has no safetensors weights" + (" (only pickle .bin files)" if pickles else ""),
                          advice)
    return RemoteModel(commit=info.sha, sizes=sizes, names=names, folder=folder)


def _download(ref: HubRef, allow_pickle: bool, on_progress: Progress, cache_dir: Path, endpoint: str | None,
              token: str | None) -> ev.Downloaded:
    from huggingface_hub import try_to_load_from_cache

    remote = remote_model(ref, allow_pickle, cache_dir, endpoint, token)
    remove_stale_partials(cache_dir, ref)
    sizes, commit = remote.sizes, remote.commit
    missing = [name for name in remote.names if not isinstance(
        try_to_load_from_cache(ref.repo_id, name, cache_dir=cache_dir, revision=commit), str)]
    total = sum(sizes.get(name, 0) for name in missing)
    check_disk_space(total, cache_dir, f"downloading {ref}")
    done = 0
    for name in missing:
        _fetch(ref, name, commit, cache_dir, endpoint, token,
               _progress_class(ref, name, sizes.get(name, 0), done, total, on_progress))
        done += sizes.get(name, 0)
    return ev.Downloaded(repo_id=ref.repo_id, revision=ref.revision_or_main, commit=commit, path=str(remote.folder),
                         files=remote.names, downloaded_bytes=total, total_bytes=remote.total_bytes)


STALE_PARTIAL_S = 600  # an .incomplete file nobody wrote to for this long belongs to a download that was killed


def remove_stale_partials(cache_dir: Path, ref: HubRef) -> list[Path]:
    """The partial files a killed download left in the model's blobs (huggingface_hub 2.4 writes each file to a
    name unique to its process, `<etag>.<8 hex>.incomplete`, so a later download can't resume it and nothing removes
    it): removed once untouched for STALE_PARTIAL_S (a running download writes to its file all the time)."""
    blobs = cache_dir / f"models--{ref.repo_id.replace('/', '--')}" / "blobs"
    removed = []
    for path in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        try:
            if time.time() - path.stat().st_mtime > STALE_PARTIAL_S:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already, or not ours to remove: the download goes on either way
            continue
    return removed


# ----------------------------------------------------------------------------- a model's facts before its weights
# What model-info reads besides config.json: whether there is a chat template (and the tokenizer's settings).
FACT_FILES = ("tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelFacts:
    """The folder model-info reads (config.json and the tokenizer's config), whether the weights are in the cache
    too, and how much a download of what training needs would fetch."""

    folder: Path
    downloaded: bool
    download_bytes: int


def fetch_model_facts(ref: HubRef, *, allow_pickle: bool = False, cache_dir: Path | None = None,
                      endpoint: str | None = None, token: str | None = None) -> ModelFacts:
    """A complete cached snapshot when there is one; else config.json, the tokenizer's config and the chat template
    fetched alone (a few KB), never a weight file. Offline, whatever the cache holds of it with a config.json."""
    cache_dir = cache_dir or hf_cache_dir()
    found = cached_snapshot(ref, cache_dir, allow_pickle)
    if found is not None:
        return ModelFacts(found[1], True, 0)
    try:
        if is_offline():
            with hub_errors(ref, cache_dir):
                from huggingface_hub.errors import OfflineModeIsEnabled

                raise OfflineModeIsEnabled(f"{ref} is not in the HF cache")
        with hub_errors(ref, cache_dir):
            remote = remote_model(ref, allow_pickle, cache_dir, endpoint, token)
            for name in FACT_FILES:
                if name in remote.sizes:
                    _fetch(ref, name, remote.commit, cache_dir, endpoint, token)
    except EngineError as exc:
        partial = _cached_config_folder(ref, cache_dir) if exc.code == "offline" else None
        if partial is None:
            raise
        return ModelFacts(partial, False, 0)
    return ModelFacts(remote.folder, False, remote.total_bytes)


def _cached_config_folder(ref: HubRef, cache_dir: Path) -> Path | None:
    """The revision's snapshot folder when it holds at least config.json (a model-info before its download)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(ref.repo_id, "config.json", cache_dir=cache_dir, revision=ref.revision_or_main)
    return Path(config).parent if isinstance(config, str) else None


def _progress_class(ref: HubRef, name: str, size: int, done_before: int, total: int, on_progress: Progress) -> Any:
    last_s = [0.0]

    def report(file_bytes: int, final: bool) -> None:
        now = time.monotonic()
        if final or now - last_s[0] >= PROGRESS_INTERVAL_S or file_bytes == 0:
            last_s[0] = now
            on_progress(ev.DownloadProgress(repo_id=ref.repo_id, file=name, file_bytes=file_bytes,
                                            file_total_bytes=size, bytes=done_before + file_bytes, total_bytes=total))

    return lambda **kwargs: _FileProgress(report, **kwargs)


# ----------------------------------------------------------------------------- search
def search(text: str, limit: int = 20, endpoint: str | None = None, token: str | None = None) -> list[HubModel]:
    """Text-generation models whose id contains `text`, most downloaded first."""
    from huggingface_hub import HfApi

    ref = HubRef(text or "search")
    _with_time_limit()
    try:
        with hub_errors(ref):
            found = HfApi(endpoint=endpoint, token=token).list_models(
                search=text, pipeline_tag="text-generation", sort="downloads", limit=limit,
                expand=["downloads", "likes", "gated", "cardData", "safetensors", "config"])
            return [_hub_model(info) for info in found]
    except EngineError as exc:
        if exc.code != "offline":
            raise
        why = "HF_HUB_OFFLINE is set" if is_offline() else "the Hub can't be reached"
        raise EngineError("offline", f"the Hub can't be searched: {why}",
                          "Connect to the internet (or unset HF_HUB_OFFLINE) and search again. Models already "
                          "downloaded are listed under 'On this computer' (qlora-studio models) and load offline."
                          ) from None


def _hub_model(info: Any) -> HubModel:
    card = info.card_data.to_dict() if hasattr(info.card_data, "to_dict") else (info.card_data or {})
    config = info.config or {}
    return HubModel(repo_id=info.id, downloads=info.downloads or 0, likes=info.likes or 0,
                    gated=bool(info.gated), license=str(card.get("license") or ""),
                    params=info.safetensors.total if info.safetensors else None, model_type=config.get("model_type"))


# ----------------------------------------------------------------------------- the user's token
TOKEN_PAGE = "https://huggingface.co/settings/tokens"


def token_status(user: str | None = None) -> HubToken:
    """Whether huggingface_hub has a token to send, and where it comes from (never the token itself)."""
    from huggingface_hub import constants, get_token

    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        source = "the HF_TOKEN environment variable"
    else:
        source = constants.HF_TOKEN_PATH if get_token() else ""
    return HubToken(present=bool(source), source=source, user=user)


def save_token(token: str, endpoint: str | None = None) -> HubToken:
    """Check `token` with the Hub, then store it where huggingface_hub keeps it (HF_TOKEN_PATH, as
    `hf auth login` does; never as a git credential). Nothing of the token is printed or returned."""
    import httpx2
    from huggingface_hub import HfApi, login
    from huggingface_hub.errors import HfHubHTTPError

    token = token.strip()
    if not token:
        raise EngineError("bad_token", "the token is empty", f"Copy a token from {TOKEN_PAGE} ('Read' is enough).")
    _with_time_limit()
    try:
        user = HfApi(endpoint=endpoint).whoami(token=token)["name"]
        login(token=token, add_to_git_credential=False)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise EngineError("bad_token", f"the Hub did not accept this token (HTTP {status}); it was not stored",
                          f"Copy the token again from {TOKEN_PAGE}, or make a new one ('Read' is enough)."
                          ) from None
    except ValueError as exc:  # an organization token
        raise EngineError("bad_token", f"{exc}; it was not stored", f"Make a personal token on {TOKEN_PAGE}."
                          ) from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise EngineError("offline", f"the token can't be checked: the Hub can't be reached ({type(exc).__name__})",
                          "Connect to the internet and save the token again; it was not stored.") from None
    return token_status(user)
