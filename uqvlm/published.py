"""The authors' published BayesVLM KFAC factors: which set belongs to which model, where the files are,
and what their bytes must be.

AaltoML/BayesVLM keeps them as plain git files (not LFS) at commit ``PINNED_COMMIT``, in
``hessians/hessian_<checkpoint>/``, five files per checkpoint (``FILES``). :func:`published_dir` hands the
tasks a folder of verified files: a local ``hessian_data.dir``, or the uqvlm cache, downloaded there from
``hessian_data.base_url`` on first use (or by ``uqvlm fetch``). A file is verified by its git blob SHA-1
(``sha1(b"blob <size>\\0" + content)``, known for every file from the repository's tree) and, where known,
its size and SHA-256. A download is written to a temporary file and renamed into place only once verified,
so a corrupted or truncated file never lands in the cache.

Provenance of the table (``docs/real-sources.md`` section A1, read from a git mirror of the repository at
the pinned commit with ``git ls-tree -r -l`` and ``git cat-file``): blob SHA-1s of all 20 files; sizes and
SHA-256 of the 14 blobs the mirror held. The other 6 (``UNVERIFIED`` below: the mirror lacked their
blobs) are checked by blob SHA-1 alone, which pins their exact bytes just as well. The ViT-B/32 set was
also checked against an independent copy (../shared/reference-hessians): identical.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from uqvlm import hub
from uqvlm.artifacts import Artifact
from uqvlm.data.sections import PUBLISHED_NUM_DATA
from uqvlm.errors import ConfigError, DatasetFormatError, DataUnavailableError

__all__ = [
    "FILES",
    "MODEL_SETS",
    "PINNED_COMMIT",
    "PUBLISHED_NUM_DATA",
    "PUBLISHED_SETS",
    "FactorFile",
    "FactorSetError",
    "factor_artifacts",
    "git_blob_sha1",
    "model_factor_set",
    "published_dir",
    "verify_file",
]

PINNED_COMMIT = "855be8b601bf5e3e3136c0a01a585bdfe5d9ad4c"
FILES = (
    "A_img_analytic.pt",
    "B_img_analytic.pt",
    "A_txt_analytic.pt",
    "B_txt_analytic.pt",
    "prior_precision_analytic.json",
)
CACHE_SUBDIR = "published-hessians"


@dataclass(frozen=True)
class FactorFile:
    """What one published file's bytes must be: its git blob SHA-1 always; size and SHA-256 where known."""

    blob_sha1: str
    size: int | None = None
    sha256: str | None = None


_B32, _L14, _H14, _SIGLIP = (
    "CLIP-ViT-B-32-laion2B-s34B-b79K",
    "CLIP-ViT-L-14-laion2B-s32B-b82K",
    "CLIP-ViT-H-14-laion2B-s32B-b79K",
    "siglip-base-patch16-256",
)
_A_IMG, _B_IMG, _A_TXT, _B_TXT, _PRIOR = FILES
# checkpoint -> file -> digests (docs/real-sources.md A1).
PUBLISHED_SETS: dict[str, dict[str, FactorFile]] = {
    _B32: {
        _A_IMG: FactorFile(
            "5e2e03af3a0aba096ce508ff48def00316cce1df",
            2360511,
            "a7955cff6f3aa1696c7ad4f996ccaf1896db299e52a9369d3dbd1cda35ccc51d",
        ),
        _A_TXT: FactorFile(
            "1b105f973a930d10d2530e870b7e13fb94e46ea3",
            1049791,
            "9e2c0d7841fac19da4c51adc4f1134c2214fe0bd056198b944e5786409e81f65",
        ),
        _B_IMG: FactorFile(
            "ed3782aa3fa19d1021203535c92167d71304c9a1",
            1049791,
            "ec78cd329c9f26bf52409d6964c0f470acc75f159966b8d57bcea69862f1e60c",
        ),
        _B_TXT: FactorFile(
            "e1f464987dfc130d97fe55deb1a939fe70abe115",
            1049791,
            "aa1108d0cabaf77e8c8bd80c22e1de34f0f58b2a6c7a87fe8deba989dcd97b51",
        ),
        _PRIOR: FactorFile(
            "8dd57ecfa8bc4705f2a66fbf8acf3eb1122be182",
            113,
            "575115c921819a9053930f74bedd6908ce4f4ac131aa6a177471188da98066c9",
        ),
    },
    _L14: {
        # UNVERIFIED size and SHA-256 (blob absent from the mirror): checked by blob SHA-1 only.
        _A_IMG: FactorFile("049945eaba468144e226b4d3d1475107d7cdf1bf"),
        _A_TXT: FactorFile(
            "5c7b4eec4092c9d109983839b1e3de09aa125f52",
            2360511,
            "ecd9260197604ccf39b4af1586a706282e1cff3916498965db912b7eb4de5ecc",
        ),
        _B_IMG: FactorFile(
            "e29ab78a470c0396a3118c2ce789f33e80148505",
            2360511,
            "5d9ca11eebf9d5d0a877a455e37630b979b9971b64e7aa7f90fcec8a57d07a3e",
        ),
        _B_TXT: FactorFile(
            "7eea5893e9c5309391714f097af64969f244343e",
            2360511,
            "9ecd9ded6d0cf2db02988b79cebcb83edb3ad0c4425876dab68413c8ffdc3e46",
        ),
        _PRIOR: FactorFile(
            "19e018218ea75f6dd17caa8c23c5de0b25ebbd16",
            113,
            "cc0ad587f149b6105f59aae0a4ae7278bc86876e67cf0d07ecda4cac3095fec9",
        ),
    },
    _H14: {
        # UNVERIFIED size and SHA-256 of the four factors (blobs absent from the mirror): blob SHA-1 only.
        _A_IMG: FactorFile("46737af5a23d926aaf64b44599c41ea7dcdd1929"),
        _A_TXT: FactorFile("ae8ad7e1a5f737141d987f9287780a5c0d39cd8c"),
        _B_IMG: FactorFile("a408bf329c46007a0e0c92d5193dd8f04e9d7b15"),
        _B_TXT: FactorFile("8af0fa2d528ef2f6f9ad0ab8137484f6aad1327e"),
        _PRIOR: FactorFile(
            "8af9703cea20ea3439c72b74c27b8a771aac0efd",
            113,
            "5c576f38b23960e4475d3167352df131051bdf5460afb92cabf4e5c7ba41f5d9",
        ),
    },
    _SIGLIP: {
        # UNVERIFIED size and SHA-256 (blob absent from the mirror): checked by blob SHA-1 only.
        _A_IMG: FactorFile("15bf0e7fe6e37be9b5ed5b778d5271dd87821867"),
        _A_TXT: FactorFile(
            "f913a92dafb86878f08bda10083d88a7d8d9541b",
            2366655,
            "bb8e6ea6eb157a19380509f3359c2bd31e22493a223dca2fb8a32a352063cdc6",
        ),
        _B_IMG: FactorFile(
            "43308ca7659c36d73c3c93403a00f7d4f848692c",
            2360511,
            "6496295372bb88d509aa5e09264a2ee0761dd51742ab13f6f6d7741f1233469c",
        ),
        _B_TXT: FactorFile(
            "464d45aecf9ecf78720650da12e3537cc96b4d94",
            2360511,
            "dcf6c1a24581bbe304c43fbffd73d7e8bb2a396c8eb6cd101e3b17e4179484a6",
        ),
        _PRIOR: FactorFile(
            "19c458bb12dbed3c45b02f7e34a91271a6a19323",
            112,
            "97a49ce5d64a19d1ef182200ab92e19f0080665e048d920f906b0f57106bdda1",
        ),
    },
}

# (open_clip model name, pretrained tag) -> published set. The published code loads the HF transformers
# checkpoints laion/<set> and google/siglip-base-patch16-256 (bayesvlm/constants.py); open_clip's tags
# name the same hub repos for the CLIPs (pretrained.py: hf_hub='laion/CLIP-ViT-B-32-laion2B-s34B-b79K/',
# ...). For SigLIP open_clip's webli tag is timm/ViT-B-16-SigLIP-256, a conversion of the same big_vision
# weights (an assumption: the two repos' bytes differ, their parameters were not compared here).
MODEL_SETS: dict[tuple[str, str], str] = {
    ("ViT-B-32", "laion2b_s34b_b79k"): _B32,
    ("ViT-L-14", "laion2b_s32b_b82k"): _L14,
    ("ViT-H-14", "laion2b_s32b_b79k"): _H14,
    ("ViT-B-16-SigLIP-256", "webli"): _SIGLIP,
}
# The same checkpoints named as hf-hub: models (open_clip's hub repos of the tags above).
HUB_SETS: dict[str, str] = {
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": _B32,
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K": _L14,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": _H14,
    "timm/ViT-B-16-SigLIP-256": _SIGLIP,
}


class FactorSetError(DatasetFormatError):
    """A factor file whose bytes are not the published ones."""


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a file's content: SHA-1 of ``b"blob <size>\\0" + data`` (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_bytes(data: bytes, expected: FactorFile, what: str) -> None:
    """Raise :class:`FactorSetError` unless ``data`` are the expected bytes (size, SHA-256, blob SHA-1)."""
    if expected.size is not None and len(data) != expected.size:
        raise FactorSetError(f"{what}: {len(data)} bytes, expected {expected.size}")
    if expected.sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != expected.sha256:
        raise FactorSetError(f"{what}: SHA-256 {got[:16]}..., expected {expected.sha256[:16]}...")
    if (got := git_blob_sha1(data)) != expected.blob_sha1:
        raise FactorSetError(f"{what}: git blob SHA-1 {got}, expected {expected.blob_sha1}")


def verify_file(path: str | os.PathLike, expected: FactorFile) -> None:
    """Raise :class:`FactorSetError` unless the file at ``path`` holds the expected bytes."""
    verify_bytes(Path(path).read_bytes(), expected, str(path))


def model_factor_set(name: str, pretrained: str | None) -> str | None:
    """The published set of an open_clip model (name and pretrained tag, or an hf-hub: source), or None."""
    for source in (name, pretrained or ""):
        if source.startswith("hf-hub:"):
            return HUB_SETS.get(source[len("hf-hub:") :].strip("/"))
    return MODEL_SETS.get((name, pretrained or ""))


def known_sets_line() -> str:
    return ", ".join(f"{n} {t} ({s})" for (n, t), s in MODEL_SETS.items())


def chosen_set(checkpoint: str | None, model_name: str, pretrained: str | None) -> str | None:
    """``hessian_data.checkpoint`` when set (checked), else the model's own set (None: it has none)."""
    if checkpoint is not None:
        if checkpoint not in PUBLISHED_SETS:
            raise ConfigError(
                f"hessian_data.checkpoint must be one of {', '.join(PUBLISHED_SETS)} (or null: the model's "
                f"own), got {checkpoint!r}"
            )
        return checkpoint
    return model_factor_set(model_name, pretrained)


def cache_folder(cache_dir: str | os.PathLike, checkpoint: str) -> Path:
    """Where the set's verified files live in the uqvlm cache (by pinned commit: the table's)."""
    return Path(cache_dir) / CACHE_SUBDIR / PINNED_COMMIT[:12] / f"hessian_{checkpoint}"


def file_url(base_url: str, checkpoint: str, filename: str) -> str:
    return f"{base_url.rstrip('/')}/hessian_{checkpoint}/{filename}"


def factor_artifacts(base_url: str, checkpoint: str, cache_dir: str | os.PathLike) -> list[Artifact]:
    """The five files of a published set as ``url`` artefacts (``dest`` relative to the cache)."""
    folder = cache_folder(".", checkpoint)
    out = []
    for filename in FILES:
        expected = PUBLISHED_SETS[checkpoint][filename]
        out.append(
            Artifact(
                kind="url",
                what=f"published factors {checkpoint}",
                url=file_url(base_url, checkpoint, filename),
                dest=str(folder / filename),
                sha256=expected.sha256,
                size=expected.size,
                path=str(cache_folder(cache_dir, checkpoint) / filename),
                extra={"git_blob_sha1": expected.blob_sha1},
            )
        )
    return out


def _verified(path: Path, expected: FactorFile) -> bool:
    try:
        verify_file(path, expected)
        return True
    except (FactorSetError, OSError):
        return False


def download_verified(url: str, path: Path, expected: FactorFile, timeout: float = 60.0) -> bool:
    """Download ``url`` to ``path`` unless a verified copy is there; True when it downloaded.

    The bytes are verified before they are renamed into place: a corrupted download leaves nothing behind
    and raises :class:`FactorSetError`; an unreachable URL raises :class:`DataUnavailableError`.
    """
    if path.is_file() and _verified(path, expected):
        return False
    if not hub.reachable(url):  # a few seconds at most, instead of urlopen's timeout
        raise DataUnavailableError(f"{url} cannot be reached")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataUnavailableError(f"cannot download {url} ({err})") from err
    verify_bytes(data, expected, f"downloaded {url}")
    from uqvlm.cache import atomic_write

    with atomic_write(path) as f:
        f.write(data)
    return True


def _check_local_folder(directory: Path, checkpoint: str | None) -> None:
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise DataUnavailableError(f"hessian_data.dir={directory}: missing {', '.join(missing)}")
    if checkpoint is None:
        return  # the user's own factors: their shapes are checked against the model where they are used
    for filename in FILES:
        try:
            verify_file(directory / filename, PUBLISHED_SETS[checkpoint][filename])
        except FactorSetError as err:
            raise FactorSetError(
                f"hessian_data.dir: {err}: not the published {checkpoint} file (for factors of your own set "
                "hessian_data.checkpoint=null with a model that has no published set, e.g. a checkpoint file)"
            ) from None


def published_dir(
    section: Mapping, model_name: str, pretrained: str | None, cache_dir: str | os.PathLike
) -> Path:
    """A folder holding the five verified files of the published set for this model.

    ``section``: the ``hessian_data`` section (``checkpoint``, ``base_url``, ``dir``). A local ``dir`` is
    checked and used as it is; otherwise the set's files are taken from the uqvlm cache, the missing ones
    downloaded from ``base_url`` (verified, atomically). Raises :class:`DataUnavailableError` when a file
    can be neither found nor downloaded, :class:`FactorSetError` when its bytes are not the published ones.
    """
    checkpoint = chosen_set(section.get("checkpoint"), model_name, pretrained)
    if section.get("dir") is not None:
        directory = Path(os.path.expanduser(str(section["dir"])))
        _check_local_folder(directory, checkpoint)
        return directory
    if checkpoint is None:
        raise ConfigError(no_set_message(model_name, pretrained))
    folder = cache_folder(cache_dir, checkpoint)
    base_url = str(section.get("base_url") or "")
    for filename in FILES:
        expected, path = PUBLISHED_SETS[checkpoint][filename], folder / filename
        if path.is_file() and _verified(path, expected):
            continue
        url = file_url(base_url, checkpoint, filename)
        try:
            download_verified(url, path, expected)
        except DataUnavailableError as err:
            raise DataUnavailableError(
                f"the published factors {checkpoint} are not in the cache ({folder}) and {err}. To provide "
                "them: run `uqvlm fetch <the same overrides>` on a machine with internet and copy the cache "
                "here, or set hessian_data.dir=/path/to/hessian_" + checkpoint
            ) from None
    return folder


def no_set_message(model_name: str, pretrained: str | None) -> str:
    return (
        f"hessian_data=published: the authors published factors for {known_sets_line()}, not for model "
        f"{model_name} ({pretrained}); choose hessian_data.checkpoint=<one of them> for a checkpoint file of "
        "that model, hessian_data.dir=/path/to/your/factors, or Hessian data to estimate them from "
        "(hessian_data=laion400m | cc12m | flickr30k)"
    )


def present_files(folder: Path, checkpoint: str) -> dict[str, bool]:
    """Which of the set's files are in ``folder`` with their published bytes."""
    return {f: (folder / f).is_file() and _verified(folder / f, PUBLISHED_SETS[checkpoint][f]) for f in FILES}
