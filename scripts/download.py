"""Download a Hugging Face model repository (weights, config, tokenizer) into a directory.

    python scripts/download.py meta-llama/Llama-2-7b-hf [--out DIR] [--token HF_TOKEN]
"""
import argparse
import os
from pathlib import Path

from huggingface_hub import errors as hub_errors
from huggingface_hub import snapshot_download

from cli import HelpFormatter, run_cli
from errors import UserError
from paths import REPO

PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model"]


def download(repo: str, out: Path, token=None) -> Path:
    try:
        path = snapshot_download(repo, local_dir=str(out), allow_patterns=PATTERNS, token=token)
    except hub_errors.GatedRepoError:
        raise UserError(f"{repo} is gated: accept its license on huggingface.co and pass --token "
                        "(or set HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"{repo} was not found on the Hugging Face hub (or it is private: pass --token)") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached ({type(e).__name__})"
        raise UserError(f"cannot download {repo}: {why}; copy the model directory here by other means "
                        "and convert it with scripts/convert_hf_checkpoint.py") from None
    return Path(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("repo", help="Hugging Face model repository, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    p.add_argument("--out", type=Path, default=None, help="directory to download into (default: checkpoints/hf/<repo>)")
    p.add_argument("--token", default=None, help="Hugging Face access token for gated models (default: HF_TOKEN or "
                   "the saved login)")
    a = p.parse_args()
    out = a.out or REPO / "checkpoints" / "hf" / a.repo
    print(f"downloaded into {download(a.repo, out, a.token)}")


if __name__ == "__main__":
    run_cli(main)
