"""generate.py's argument checks and scripts/eval_ppl.py's token budget: bad input is one UserError (one line on
stderr through run_cli), raised before any model work."""
import json

import pytest

import generate
from errors import UserError
from scripts.eval_ppl import windows


@pytest.mark.parametrize("argv,what", [
    (["--prompt", ""], "--prompt is empty"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 2"),
    (["--sparse-prefill-from", "-3"], "--sparse-prefill-from must be >= 0"),
    (["--sparsity", "1.0"], "--sparsity must be in"),
])
def test_bad_arguments_are_one_line(argv, what):
    with pytest.raises(UserError, match=what) as e:
        generate.main(argv)
    assert "\n" not in str(e.value)


def test_a_prompt_over_max_seq_len_is_refused_before_it_is_echoed(capsys):
    with pytest.raises(UserError, match=r"prompt \(1 tokens\) \+ --max-new-tokens 8 exceed --max-seq-len 4"):
        generate.main(["--max-seq-len", "4", "--prompt", "hello", "--max-new-tokens", "8"])
    assert capsys.readouterr().out == ""


def test_checkpoint_that_is_a_file_or_lacks_shape_keys(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("not a directory")
    with pytest.raises(UserError, match="is a file: --checkpoint takes the directory"):
        generate.main(["--checkpoint", str(f)])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"dim": 64, "n_head": 4}))
    with pytest.raises(UserError, match="config is missing n_layer, intermediate_size, vocab_size"):
        generate.main(["--checkpoint", str(tmp_path / "ckpt")])


@pytest.mark.parametrize("n,window,stride,max_tokens", [(5000, 512, 256, 512), (5000, 512, 256, 700),
                                                         (5000, 512, 256, 100000), (300, 512, 256, 1000)])
def test_eval_windows_score_at_most_max_tokens(n, window, stride, max_tokens):
    spans = windows(n, window, stride, max_tokens)
    scored = sum(end - begin - max(first, 1) for begin, end, first in spans)
    assert scored == min(max_tokens, n - 1)  # every token after the first is scored once, up to the budget
    assert all(0 <= begin < end <= n for begin, end, _ in spans)
