"""Hugging Face glue: ``GDNConfig``, ``GDNForCausalLM`` and a byte-level tokenizer.

Needs the ``hf`` extra (``pip install -e ".[hf]"``). Importing this module registers the
model type ``"gdn"`` with ``AutoConfig`` and ``AutoModelForCausalLM``, so a directory written
by ``save_pretrained`` (config.json + model.safetensors, plus the tokenizer from
``save_byte_tokenizer``) loads with ``AutoModelForCausalLM.from_pretrained(path)`` and in
lm-eval's ``hf`` model type (``model_args="pretrained=path"``), offline.

Letters: B batch, T time, V vocab.

``GDNForCausalLM`` wraps a ``CausalLM`` as ``.model``; its state dict is the CausalLM's under
the ``model.`` prefix. Tied embeddings have no head parameter (``CausalLM.head_weight`` is the
embedding), so nothing needs re-tying on load. ``attention_mask`` with zeros (padding, on
either side) is handled by packing the unmasked tokens of each row into documents
(``cu_seqlens``), so padding never enters a recurrent state; logits at padding positions are
zeros, and with labels padding is neither a target nor predicts one (as a Trainer with a
padding collator expects). HF ``.generate()`` works for greedy search and sampling (one
``ModelCache`` per call, made in ``_prepare_cache_for_generation``); beam search and assisted
decoding are not supported, since the state cannot be re-ordered or rolled back.
``gdn.models.generate`` is the documented route and the faster one.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from gdn.models.cache import ModelCache
from gdn.models.config import ModelConfig
from gdn.models.lm import CausalLM
from gdn.models.loss import IGNORE_INDEX, chunked_cross_entropy, next_token_targets

__all__ = ["GDNConfig", "GDNForCausalLM", "byte_tokenizer", "save_byte_tokenizer",
           "SPECIAL_TOKENS"]

# Byte-level vocabulary: ids 0–255 are the bytes, then these (vocab_size ≥ 260).
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                  "unk_token": "<|unk|>"}
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class GDNConfig(PretrainedConfig):
    """A ``ModelConfig`` as a Hugging Face config: the same fields under the same names,
    except ``tie_embeddings``, which is HF's ``tie_word_embeddings``."""

    model_type = "gdn"

    def __init__(self, tie_word_embeddings: bool = True, bos_token_id: int | None = BOS_ID,
                 eos_token_id: int | None = EOS_ID, pad_token_id: int | None = PAD_ID,
                 **kwargs) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        model_fields = {name: kwargs.pop(name, defaults[name]) for name in _MODEL_FIELDS
                        if name != "tie_embeddings"}
        # Validate (and derive sizes) now, so that a bad config.json fails at load time.
        resolved = ModelConfig(tie_embeddings=tie_word_embeddings, **model_fields)
        for name, value in resolved.to_dict().items():
            if name != "tie_embeddings":
                setattr(self, name, value)
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> GDNConfig:
        values = config.to_dict()
        return cls(tie_word_embeddings=values.pop("tie_embeddings"), **values, **kwargs)

    def to_model_config(self) -> ModelConfig:
        values = {name: getattr(self, name) for name in _MODEL_FIELDS if name != "tie_embeddings"}
        return ModelConfig(tie_embeddings=self.tie_word_embeddings, **values)


class GenerationCache(ModelCache):
    """A ``ModelCache`` with the few attributes transformers' ``.generate()`` reads."""

    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seen.max())


class GDNForCausalLM(PreTrainedModel, GenerationMixin):
    """``CausalLM`` behind the ``PreTrainedModel`` interface (save/load, Auto classes,
    ``.generate()``, lm-eval); see the module docstring."""

    config_class = GDNConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True  # generation state cannot be rolled back (no assisted decoding)
    # The loss is the mean over the batch's targets, not a sum over num_items_in_batch: the
    # Trainer must divide it for gradient accumulation itself (it would not, seeing **unused).
    accepts_loss_kwargs = False

    def __init__(self, config: GDNConfig) -> None:
        super().__init__(config)
        self.model = CausalLM(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # transformers calls this once per module, children first: for every module of a new
        # model, and in from_pretrained for each module holding weights the checkpoint lacked
        # (the others' parameters are flagged _is_hf_initialized). Each module gets CausalLM's
        # init of its own parameters: normal(0, σ) with the residual scaling for nn.Linear /
        # nn.Embedding, reset_parameters() for the layers (A_log, dt_bias, D, conv, norms).
        # reset_parameters() also redraws children and writes A_log/dt_bias with copy_, which
        # transformers' guard on torch.nn.init does not see, so everything but this module's
        # own unloaded parameters is put back afterwards.
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            self.model.init_projection(module)
            return
        own = [p for p in module.parameters(recurse=False)
               if not getattr(p, "_is_hf_initialized", False)]
        if not own or not hasattr(module, "reset_parameters"):
            return
        own_ids = {id(p) for p in own}
        kept = [(p, p.detach().clone()) for p in module.parameters() if id(p) not in own_ids]
        module.reset_parameters()
        with torch.no_grad():
            for p, value in kept:
                p.copy_(value)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear | None:
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our ModelCache, not transformers' DynamicCache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: ModelCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                cu_seqlens: torch.Tensor | None = None, return_dict: bool | None = None,
                **unused) -> CausalLMOutputWithPast:
        """input_ids [B, T] → logits [B, T, V] float32 (the last ``logits_to_keep`` positions
        if > 0; none when labels are given) and the mean next-token loss. ``labels`` follow
        CausalLM (the shift is done inside; −100 ignored). ``past_key_values`` is a
        ``ModelCache`` advanced in place. Extra HF keywords (position_ids, cache_position,
        output_attentions, …) are accepted and ignored: positions come from the cache."""
        lm = self.model
        cache = past_key_values if isinstance(past_key_values, ModelCache) else None
        loss = None
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
        if mask is not None and not bool(mask.all()):
            if cu_seqlens is not None:
                raise ValueError("attention_mask with padding cannot be combined with "
                                 "cu_seqlens; pass packed documents through cu_seqlens alone")
            mask = mask.bool()
            hidden = _packed_hidden(lm, input_ids, mask, cache)
            if labels is not None:
                # Padding is never a target, and padding positions predict nothing.
                targets = next_token_targets(labels.masked_fill(~mask, IGNORE_INDEX), None)
                targets = targets.masked_fill(~mask, IGNORE_INDEX)
                loss = chunked_cross_entropy(hidden, lm.head_weight, targets)
        else:
            hidden = lm.hidden_states(input_ids, cu_seqlens=cu_seqlens, cache=cache)
            if labels is not None:
                loss = lm.loss(hidden, labels, cu_seqlens=cu_seqlens)
        logits = None
        if labels is None:
            kept = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
            logits = lm.logits(kept)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    # --- .generate() plumbing (transformers' private hooks; tested in tests/models) -------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode,
                                      batch_size, max_cache_length, *args, **kwargs):
        if (generation_config.num_beams or 1) > 1:
            raise ValueError(f"num_beams={generation_config.num_beams}: beam search is not "
                             f"supported (a recurrent state cannot be re-ordered); use 1")
        if generation_config.use_cache is False:
            return
        if model_kwargs.get("past_key_values") is None:
            cache = self.model.new_cache(batch_size, max_length=max_cache_length)
            model_kwargs["past_key_values"] = GenerationCache(layers=cache.layers,
                                                              max_length=cache.max_length)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values=None,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        if isinstance(past_key_values, ModelCache) and bool((past_key_values.seen > 0).any()):
            input_ids = input_ids[:, -1:]  # the prompt is in the cache: feed the new token
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "past_key_values": past_key_values, "logits_to_keep": 1}


def _packed_hidden(lm: CausalLM, input_ids: torch.Tensor, mask: torch.Tensor,
                   cache: ModelCache | None) -> torch.Tensor:
    """Hidden states [B, T, D] of padded rows, computed as packed documents: row b's unmasked
    tokens, in order, are document b (cache row b); masked positions are left at zero."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if not bool((lengths > 0).all()):
        raise ValueError("attention_mask has a row with no tokens")
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    packed = lm.hidden_states(input_ids[mask].unsqueeze(0), cu_seqlens=cu_seqlens, cache=cache)
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
    hidden[mask] = packed[0]
    return hidden


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what the tokenizers
    library's ByteLevel pre-tokenizer emits): printable Latin-1 bytes map to themselves, the
    others to 256 + n in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built locally (no hub): token id = byte value (0–255), then
    <|bos|> 256, <|eos|> 257, <|pad|> 258, <|unk|> 259. Decoding inverts encoding exactly for
    any UTF-8 text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for offset, token in enumerate(SPECIAL_TOKENS.values()):
        vocab[token] = 256 + offset
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length,
                                   **SPECIAL_TOKENS)


def save_byte_tokenizer(path: str | os.PathLike, *, model_max_length: int = 2048) -> None:
    """Write ``byte_tokenizer()`` into ``path`` (next to a saved model) for AutoTokenizer."""
    byte_tokenizer(model_max_length=model_max_length).save_pretrained(path)


AutoConfig.register(GDNConfig.model_type, GDNConfig, exist_ok=True)
AutoModelForCausalLM.register(GDNConfig, GDNForCausalLM, exist_ok=True)
