"""Tokenizers for a checkpoint directory: HF `tokenizers` (tokenizer.json), sentencepiece
(tokenizer.model) and tiktoken (Llama-3's original/tokenizer.model); BOS/EOS; chat prompts (the checkpoint's own
Jinja chat template, three built-in formats where it has none); and a tokenizer.json built from a GGUF file's
vocabulary."""
import base64
import json
import re
from pathlib import Path
from typing import Optional

import jinja2
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import SentencePieceProcessor
from tokenizers import Tokenizer as HFTokenizer

from errors import UserError

# Llama-3's pre-tokenizer pattern and special tokens (names as in Llama-3.1; ids follow the 128000 ranks)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
CHAT_FORMATS = ("chatml", "llama3", "llama2")
CHAT_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


class _HFBackend:
    def __init__(self, path: Path):
        self.tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def piece(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def adds_bos(self) -> Optional[bool]:
        plain, full = self.encode("a"), self.tok.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[1:] == plain

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    def __init__(self, path: Path):
        self.sp = SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def token_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def piece(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.vocab_size() else None

    def adds_bos(self) -> Optional[bool]:
        return None

    def default_bos(self):
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def default_eos(self):
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def vocab_size(self) -> int:
        return self.sp.vocab_size()


class _TiktokenBackend:
    """Llama-3's tokenizer.model: lines of `base64-token rank`, plus 256 special tokens after them."""

    def __init__(self, path: Path):
        ranks = {}
        for line in path.read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        n = len(ranks)
        names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]
        self.special = {name: n + i for i, name in enumerate(names[:256])}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special)

    def encode(self, text: str) -> list:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_id(self, token: str) -> Optional[int]:
        return self.special.get(token)

    def piece(self, i: int) -> Optional[str]:
        return next((name for name, j in self.special.items() if j == i), None)

    def adds_bos(self) -> Optional[bool]:
        return None

    def default_bos(self):
        return self.special["<|begin_of_text|>"]

    def default_eos(self):
        return self.special["<|end_of_text|>"]

    def vocab_size(self) -> int:
        return self.enc.n_vocab


def _is_tiktoken_file(path: Path) -> bool:
    head = path.open("rb").read(256)
    return re.fullmatch(rb"([A-Za-z0-9+/=]+ \d+\n)+[A-Za-z0-9+/=]* ?\d*", head) is not None


def _token_str(v) -> Optional[str]:
    return v.get("content") if isinstance(v, dict) else v


def _ids(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


class Tokenizer:
    """chat_template: the checkpoint's Jinja template (tokenizer_config.json), rendered as transformers renders it;
    chat_format: the built-in format its markers name (used where there is no template, and for the end-of-turn
    token); special: the text of special tokens the rendered template may contain -> their ids."""

    def __init__(self, backend, bos_id: Optional[int], eos_ids: list, add_bos: bool, chat_format: Optional[str],
                 chat_template: Optional[str] = None, special: Optional[dict] = None):
        self.backend, self.bos_id, self.eos_ids = backend, bos_id, list(dict.fromkeys(eos_ids))
        self.add_bos, self.chat_format = add_bos, chat_format
        self.special = {k: v for k, v in (special or {}).items() if k and v is not None}
        self.template = None
        if chat_template:
            try:
                self.template = _JINJA.from_string(chat_template)
            except jinja2.TemplateError:  # a template Jinja cannot compile: the built-in format its markers name
                pass
        end = self.backend.token_id(CHAT_END[chat_format]) if chat_format in CHAT_END else None
        self.stop_ids = set(self.eos_ids) | ({end} if end is not None else set())

    @property
    def has_chat(self) -> bool:
        return self.template is not None or self.chat_format is not None

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        ids = self.backend.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode(ids)

    def encode_chat(self, messages: list, add_generation_prompt: bool = True) -> list:
        """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids."""
        if self.template is not None:
            return self._encode_special(self.render_chat(messages, add_generation_prompt))
        fmt = self.chat_format
        if fmt is None:
            raise UserError("this model has no chat template; chat needs an instruct model")
        if fmt == "chatml":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), bos=False)
        if fmt == "llama3":
            text = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
            if add_generation_prompt:
                text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
            return self.encode(text, bos=False)
        # llama2: the system prompt goes inside the first [INST]; every turn is <s>[INST] .. [/INST] .. </s>
        msgs = list(messages)
        system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        ids = []
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                content = m["content"].strip()
                if system is not None and i == 0:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                ids += self.encode(f"[INST] {content} [/INST]", bos=True)
            else:
                ids += self.encode(f" {m['content'].strip()} ", bos=False) + self.eos_ids[:1]
        return ids


    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template applied to messages (the variables transformers passes)."""
        ids_text = {i: t for t, i in self.special.items()}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=ids_text.get(self.bos_id, ""),
                                        eos_token=ids_text.get(self.eos_ids[0], "") if self.eos_ids else "")
        except jinja2.TemplateError as e:  # raise_exception() in the template, or an error in it
            raise UserError(f"the chat template refused the conversation: {e}") from None

    def _encode_special(self, text: str) -> list:
        """Text with special tokens in it (a rendered template) -> ids, each special token's text its own id."""
        if not self.special:
            return self.encode(text, bos=False)
        ids = []
        pattern = "(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")"
        for i, piece in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.special[piece])
            elif piece:
                ids += self.encode(piece, bos=False)
        return ids


def _raise(message):
    raise jinja2.TemplateError(message)


# as transformers sets it up for chat templates
_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_JINJA.globals["raise_exception"] = _raise


class StreamDecoder:
    """Turns a growing list of ids into newly completed text (no split UTF-8 characters, SP spaces kept)."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids=()):
        self.tok, self.ids = tokenizer, list(prefix_ids)[-4:]
        self.printed = len(self.tok.decode(self.ids))

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


def _chat_template(template) -> Optional[str]:
    """tokenizer_config.json's chat_template: a string, or [{"name": ..., "template": ...}] (then "default")."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


def _detect_chat_format(template, has_token) -> Optional[str]:
    template = template or ""
    for fmt, marker in (("chatml", "<|im_start|>"), ("llama3", "<|start_header_id|>"), ("llama2", "[INST]")):
        if marker in template:
            return fmt
    for fmt, marker in (("chatml", "<|im_start|>"), ("llama3", "<|start_header_id|>")):
        if has_token(marker):
            return fmt
    return None


def load_tokenizer(ckpt: Path) -> Tokenizer:
    ckpt = Path(ckpt)
    cfg = _read_json(ckpt / "tokenizer_config.json")
    gen = _read_json(ckpt / "generation_config.json")
    candidates = [ckpt / "tokenizer.json", ckpt / "tokenizer.model", ckpt / "original" / "tokenizer.model"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise UserError(f"{ckpt} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        if path.suffix == ".json":
            backend = _HFBackend(path)
        elif _is_tiktoken_file(path):
            backend = _TiktokenBackend(path)
        else:
            backend = _SentencePieceBackend(path)
    except Exception as e:  # the libraries raise assorted types for a corrupt file
        raise UserError(f"could not load the tokenizer {path}: {e}") from None

    def token_id(name):
        s = _token_str(name)
        return backend.token_id(s) if s else None

    bos = gen.get("bos_token_id")
    if bos is None:
        bos = token_id(cfg.get("bos_token"))
    if bos is None and hasattr(backend, "default_bos"):
        bos = backend.default_bos()
    eos = _ids(gen.get("eos_token_id")) + [i for i in [token_id(cfg.get("eos_token"))] if i is not None]
    if not eos and hasattr(backend, "default_eos"):
        eos = [backend.default_eos()]
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = backend.adds_bos()
    if add_bos is None:
        add_bos = True
    template = _chat_template(cfg.get("chat_template"))
    chat = _detect_chat_format(template, lambda s: backend.token_id(s) is not None)
    eos = [i for i in eos if i is not None]
    # the special tokens a template writes as text: BOS/EOS by name (the template's bos_token, eos_token)
    special = {}
    for name, i in (("bos_token", bos), ("eos_token", eos[0] if eos else None)):
        if i is not None:
            special[_token_str(cfg.get(name)) or backend.piece(i)] = i
    return Tokenizer(backend, bos, eos, bool(add_bos), chat, template, special)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> tokenizer.json (+ tokenizer_config.json, generation_config.json)

GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 3, 4, 6


def tokenizer_files_from_gguf(kv: dict) -> dict:
    """kv: GGUF metadata (tokenizer.ggml.*). Returns {filename: json-able dict} for the CKPT directory."""
    kind = kv.get("tokenizer.ggml.model")
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise UserError("the GGUF file has no tokenizer vocabulary")
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _bpe_tokenizer_json(tokens, types, kv.get("tokenizer.ggml.merges", []), kv.get("tokenizer.ggml.pre", ""))
        default_add_bos = False
    elif kind == "llama":
        tok = _spm_tokenizer_json(tokens, types, kv.get("tokenizer.ggml.scores"), kv.get("tokenizer.ggml.add_space_prefix", True))
        default_add_bos = True
    else:
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 or llama)")
    bos, eos = kv.get("tokenizer.ggml.bos_token_id"), kv.get("tokenizer.ggml.eos_token_id")
    add_bos = kv.get("tokenizer.ggml.add_bos_token", default_add_bos)
    if add_bos and bos is not None:
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}},
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    cfg = {"add_bos_token": bool(add_bos), "bos_token": tokens[bos] if bos is not None else None,
           "eos_token": tokens[eos] if eos is not None else None}
    if kv.get("tokenizer.chat_template"):
        cfg["chat_template"] = kv["tokenizer.chat_template"]
    return {"tokenizer.json": tok, "tokenizer_config.json": cfg,
            "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos}}


def _added_tokens(tokens, types, special_types) -> list:
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, (t, ty) in enumerate(zip(tokens, types)) if ty in special_types]


def _bpe_tokenizer_json(tokens, types, merges, pre: str) -> dict:
    """Byte-level BPE (GPT-2 style). The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` types."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        split = [{"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False}]
    elif pre == "smollm":  # every digit alone, then the GPT-2 pattern
        split = [{"type": "Digits", "individual_digits": True},
                 {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False}]
    elif pre in ("", "default", "gpt-2", "gpt2"):
        split = [{"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False}]
    else:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, gpt-2)")
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, (GGUF_CONTROL, GGUF_USER_DEFINED)),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": split + [byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def _spm_tokenizer_json(tokens, types, scores, add_space_prefix: bool) -> dict:
    """SentencePiece BPE vocabulary as HF BPE with byte fallback. A merge (a, b) exists where a + b is a
    normal token; merges are ranked by the merged token's score, best first, as sentencepiece does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = scores if scores is not None else [-float(i) for i in range(len(tokens))]
    merges = []
    for piece, i in vocab.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], i, vocab[a], vocab[b], a, b))
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types, (GGUF_CONTROL, GGUF_USER_DEFINED, 2)),
        # like sentencepiece: a leading space is always added, spaces become U+2581, no pre-splitting
        "normalizer": {"type": "Sequence", "normalizers": [
            *([{"type": "Prepend", "prepend": "\u2581"}] if add_space_prefix else []),
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if add_space_prefix else [])]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]},
    }


def byte_tokenizer_files(vocab_size: int) -> dict:
    """A byte-level tokenizer for random-weight checkpoints: ids 0-2 are <s>, </s>, <unk>, then the 256
    bytes; the rest of the vocabulary decodes to placeholders and is never produced by encoding."""
    chars = byte_chars()
    specials = ["<s>", "</s>", "<unk>"]
    tokens = specials + chars + [f"<|x{i}|>" for i in range(vocab_size - len(specials) - len(chars))]
    if len(tokens) != vocab_size:
        raise UserError(f"a byte tokenizer needs a vocabulary of at least {len(specials) + 256} tokens")
    tok = _bpe_tokenizer_json(tokens, [3, 3, 3] + [1] * (vocab_size - 3), [], "gpt-2")
    return {"tokenizer.json": tok, "tokenizer_config.json": {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"},
            "generation_config.json": {"bos_token_id": 0, "eos_token_id": 1}}


def byte_chars() -> list:
    """GPT-2's byte -> printable character table, indexed by byte."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    return out
