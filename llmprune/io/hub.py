"""Push an llmprune output directory to the Hugging Face Hub, with its model card, in one commit.

`push_output` is what `llmprune push DIR REPO_ID` and `llmprune compress ... --push-to-hub REPO_ID`
call. What is sent is decided once, by `plan_upload`, so `--dry-run` lists exactly what a real push
sends. The card is uploaded from memory and written into DIR only after the commit succeeded, so a
failed push leaves DIR as it was.

The token comes from huggingface_hub's own lookup (`HF_TOKEN`, then the `hf auth login` cache); it is
never printed, and every message raised from here has it scrubbed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.io.card.files import CARD_NAME, is_generated_card, write_card
from llmprune.io.card.render import eval_status, render_card_checked
from llmprune.io.sidecar import read_sidecar

# Files in a repo that decide which weights transformers loads: a stale one left over from an
# earlier push (e.g. `model.safetensors` next to new shards) would silently shadow the new weights.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass
class UploadFile:
    path_in_repo: str
    size: int
    local_path: Path | None = None  # None: uploaded from `content` (the card)
    content: bytes | None = None


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[UploadFile]
    card: str
    card_generated: bool  # False: a hand-written README.md was uploaded as it is
    dry_run: bool
    commit_url: str | None = None
    deleted: list[str] = field(default_factory=list)
    eval_status: str | None = None  # eval/results.json: "verified", "unverified" or None (no results)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def check_repo_id(repo_id: str, option: str | None = None) -> str:
    """Validate REPO_ID (`name` or `namespace/name`) before any work; returns it stripped. `option`
    names the flag that gave it (`--base-model`) in messages."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    what = f"{option}: the" if option else "the"
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise UserError(f"{what} Hub repository id is empty; give NAMESPACE/NAME, e.g. alice/llama-3-8b-wanda-2of4")
    repo_id = repo_id.strip()
    prefix = f"{option} " if option else ""
    if repo_id.startswith(("http://", "https://")):
        raise UserError(f"{prefix}give the Hub repository id, not a URL ({repo_id}); e.g. alice/my-model")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{prefix}{repo_id!r} is not a valid Hub repository id: use NAMESPACE/NAME with letters, "
                        "digits, '-', '_' or '.' (no '--' or '..', at most 96 characters each, not ending in .git)"
                        ) from None
    return repo_id


def check_push_ready() -> None:
    """For `compress --push-to-hub`: a token and a reachable Hub, checked before hours of work."""
    from huggingface_hub import get_token

    from llmprune.io.network import hub_reachable, why_offline

    later = "or drop --push-to-hub and push later with `llmprune push DIR REPO_ID`"
    if not get_token():
        raise UserError(f"no Hugging Face token found for --push-to-hub; run `hf auth login` or set HF_TOKEN, {later}")
    if not hub_reachable():          # also False in offline mode (HF_HUB_OFFLINE), and says which
        raise UserError(f"{why_offline()}, so --push-to-hub cannot work; {later.replace('or drop', 'drop')}")


def _visible(path: Path, root: Path) -> bool:
    """Hidden files and folders (`.git`, `.cache`, editor swap files, our own temp files) stay home."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def plan_upload(directory: str | os.PathLike, repo_id: str | None = None,
                base_model: str | None = None) -> tuple[list[UploadFile], str, bool]:
    """(files to send, card text, card_generated). The card replaces README.md unless that was hand-written.
    Eval results measured on other weights are refused even then (they would be uploaded beside it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give an llmprune output directory")
    read_sidecar(directory)  # "not an llmprune output" is a UserError
    readme = directory / CARD_NAME
    generated = is_generated_card(readme)
    if generated:
        card = render_card_checked(directory, repo_id=repo_id, base_model=base_model)
    else:
        eval_status(directory)
        card = readme.read_text(encoding="utf-8")
    files: list[UploadFile] = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or not _visible(path, directory):
            continue
        rel = path.relative_to(directory).as_posix()
        if rel == CARD_NAME:
            continue
        files.append(UploadFile(rel, path.stat().st_size, local_path=path))
    card_bytes = card.encode("utf-8")
    files.insert(0, UploadFile(CARD_NAME, len(card_bytes), content=card_bytes))
    return files, card, generated


def default_commit_message(directory: str | os.PathLike, base_model: str | None = None) -> str:
    from llmprune import __version__
    from llmprune.io.card.models import hub_id

    sidecar = read_sidecar(directory)
    base = base_model or hub_id(sidecar.get("base_model"), sidecar)   # never a local path
    kind = sidecar.get("kind")
    what = {"compress": "pruned model", "delta": "delta-sparsified model", "pack": "packed 2:4 model"}.get(kind, kind)
    return f"Upload {what}" + (f" from {base}" if base else "") + f" (llmprune {__version__})"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _hub_error(exc: BaseException, repo_id: str, user: str | None, token: str | None) -> UserError:
    """One line for every way a push fails; the token never appears in it."""
    from huggingface_hub.errors import (
        BadRequestError, HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalTokenNotFoundError):
        return UserError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN to a token with write access")
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run)")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"branch not found in {repo_id}; check --revision")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = (getattr(exc, "server_message", None) or "").strip().splitlines()
        detail = f" ({_scrub(server[0], token)})" if server and server[0] else ""
        if status == 401:
            return UserError("the Hugging Face token was rejected (401 Unauthorized); run `hf auth login --force` "
                             "or set HF_TOKEN to a valid token")
        if status == 403 or (isinstance(exc, RepositoryNotFoundError) and status == 404):
            namespace = repo_id.split("/")[0]
            if user and namespace == user:
                return UserError(f"this token cannot write to {repo_id} (it is read-only or lacks write access "
                                 "to this repository); create a token with write access and run `hf auth login`")
            mine = f"; push to your own namespace instead, e.g. {user}/{repo_id.split('/')[-1]}" if user else ""
            return UserError(f"no write access to {repo_id}: it belongs to {namespace!r}, which this token cannot "
                             f"write to (or the token is read-only){mine}")
        if isinstance(exc, BadRequestError) or status == 400:
            return UserError(f"the Hub refused the upload to {repo_id}{detail or ': ' + _first_line(exc, token)}")
        if status == 429:
            return UserError("the Hub is rate-limiting this token (429); wait a few minutes and push again")
        if status is not None and status >= 500:
            return UserError(f"the Hub failed with HTTP {status} while pushing to {repo_id} (the local directory "
                             "was not changed); try again later")
        return UserError(f"the Hub answered HTTP {status} for {repo_id}{detail}")
    if isinstance(exc, ValueError):
        if "Invalid metadata in README.md" in str(exc):
            return UserError(f"the Hub rejected the model card metadata: {_first_line(exc, token, skip=1)}")
        return UserError(f"the Hub sent an answer llmprune could not use for {repo_id}: {_first_line(exc, token)}")
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return UserError(f"could not read {getattr(exc, 'filename', None) or 'a file'} of the output directory "
                         f"({type(exc).__name__}); nothing was pushed")
    return UserError(f"could not reach the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc, token)}); "
                     "check the network connection (and HF_ENDPOINT if set), then push again")


def _first_line(exc: BaseException, token: str | None, skip: int = 0) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[min(skip, len(lines) - 1)] if lines else type(exc).__name__
    return _scrub(line, token)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError]  # ConnectionError is an OSError
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def push_output(directory: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, base_model: str | None = None) -> PushResult:
    """Create the repo if missing and upload DIR (with a fresh card) as one commit.

    `dry_run` decides everything (files, sizes, card) and touches no network. After a successful
    commit a generated card is written to DIR/README.md; a failure leaves DIR unchanged.
    `base_model`: the Hub id of the base model, for the card (`--base-model`).
    """
    repo_id = check_repo_id(repo_id)
    if base_model is not None:
        base_model = check_repo_id(base_model, "--base-model")
    directory = Path(directory).expanduser()
    if revision is not None and not revision.strip():
        raise UserError("--revision is empty; give a branch name or leave it out for main")
    card_repo_id = repo_id if "/" in repo_id else None
    files, card, generated = plan_upload(directory, repo_id=card_repo_id, base_model=base_model)
    status = eval_status(directory)
    message = commit_message or default_commit_message(directory, base_model)
    if dry_run:
        return PushResult(repo_id, revision, files, card, generated, dry_run=True, eval_status=status)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run)")
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN to a token with write access")
    from llmprune.io.network import hub_reachable

    if not hub_reachable():
        raise UserError("the Hugging Face Hub is unreachable (no network), so nothing was pushed; push again when "
                        "connected (or use --dry-run)")
    api = HfApi(token=token)
    user = None
    try:
        user = api.whoami().get("name")
        if "/" not in repo_id:
            if not user:
                raise UserError(f"cannot tell which account {repo_id} belongs to; give NAMESPACE/{repo_id}")
            repo_id = f"{user}/{repo_id}"
            # The card's usage snippet names the repo: render it again with the full id.
            files, card, generated = plan_upload(directory, repo_id=repo_id, base_model=base_model)
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        sending = {f.path_in_repo for f in files}
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = sorted(p for p in remote if p not in sending and p.endswith(_WEIGHT_SUFFIXES))
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=f.path_in_repo,
                               path_or_fileobj=f.content if f.content is not None else str(f.local_path))
            for f in files
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        total = format_size(sum(f.size for f in files))
        print(f"Uploading {len(files)} files ({total}) to {repo_id} in one commit...", flush=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    except UserError:
        raise
    except (HfHubHTTPError, LocalTokenNotFoundError, ValueError, *_network_errors()) as exc:
        raise _hub_error(exc, repo_id, user, token) from None
    if generated:
        write_card(directory, card)
    return PushResult(repo_id, revision, files, card, generated, dry_run=False,
                      commit_url=str(getattr(info, "commit_url", "") or ""), deleted=stale, eval_status=status)


def format_size(n: int) -> str:
    from llmprune.io.files import format_bytes

    return format_bytes(n)


def summary_table(result: PushResult) -> str:
    """Files with sizes, one per line, and a total line."""
    width = max([len(f.path_in_repo) for f in result.files] + [4])
    lines = [f"  {f.path_in_repo:<{width}}  {format_size(f.size):>10}" for f in result.files]
    lines.append(f"  {'total':<{width}}  {format_size(result.total_bytes):>10}  ({len(result.files)} files)")
    return "\n".join(lines)
