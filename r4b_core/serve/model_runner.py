"""The engine's forwards over the paged KV cache: a batched decode step and a prefill chunk, plus the
vision features of recently seen images.

    decode(seqs)            tokens [Bb, 1] ─► language model over a PagedBatch ─► logits [n, V]
                            (Bb = the batch bucket >= n; padding rows read and write the null block)
    prefill(seq, end)       token_ids[num_computed:end] (image features spliced in where the chunk has
                            image tokens) ─► language model ─► logits of the last position [1, V]
                            (or of every position when the request asked for prompt logprobs)
    prefill_packed(chunks)  several sequences' chunks end to end in one row [1, T] (PackedPrefill,
                            r4b_core/models/packed_prefill.py) ─► logits of each chunk's last position [k, V]

Shapes per step are bucketed: the decode batch to the next of ``batch_buckets``, the attended length to
``kv_bucket(longest)`` slots, so the number of distinct shapes stays small (compiled steps, CUDA graphs).
The language model (``model.language_model``, a Qwen3ForCausalLM) is called directly with
``inputs_embeds``; the splice is ``R4BForConditionalGeneration._embed``'s (features replace the image
tokens' embeddings in order), done per chunk from the features of the whole prompt.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence as Seq

import torch

from r4b_core.models.packed_prefill import PackedPrefill
from r4b_core.models.paged_kv_cache import PagedKVCache, blocks_for_tokens
from r4b_core.serve.scheduler import Sequence


def kv_bucket(n: int, block_size: int) -> int:
    """Slots the decode step attends over for a longest sequence of ``n`` tokens: the next power of two
    from 128 up to 4096, then the next multiple of 4096 (about 13 shapes over a 40k context)."""
    if n <= 4096:
        size = max(128, 1 << (max(n, 1) - 1).bit_length())
    else:
        size = -(-n // 4096) * 4096
    return blocks_for_tokens(size, block_size) * block_size


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, ... up to (and including) ``max_batch_size``."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return tuple(sizes)


def image_digest(model_inputs: dict) -> bytes | None:
    """A digest of a request's images after preprocessing (pixel values, sizes, views): equal digests give
    equal image features, whatever file or URL they came from."""
    pixels = model_inputs.get("pixel_values")
    if pixels is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        value = model_inputs.get(key)
        if value is not None:
            t = value.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, max_batch_size: int, pad_token_id: int,
                 fixed_batch: bool = False, fixed_kv_len: int | None = None, vision_cache_size: int = 8,
                 decode_fn=None) -> None:
        self.model, self.cache, self.pad_token_id = model, cache, pad_token_id
        self.lm = getattr(model, "language_model", model)
        self.image_token_id = getattr(model.config, "image_token_index", None)
        self.device = cache.k.device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.buckets = (max_batch_size,) if fixed_batch else batch_buckets(max_batch_size)
        self.fixed_kv_len = fixed_kv_len
        self.decode_fn = decode_fn
        self._features: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.vision_cache_size = vision_cache_size
        self.vision_hits = self.vision_runs = 0

    def _bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for each of ``seqs`` (their last token is fed): logits [len(seqs), V]."""
        n = len(seqs)
        rows = self._bucket(n)
        tables = [s.blocks for s in seqs] + [[0]] * (rows - n)
        lens = [s.num_computed for s in seqs] + [0] * (rows - n)
        longest = max(lens) + 1
        capacity = self.fixed_kv_len or kv_bucket(longest, self.cache.block_size)
        batch = self.cache.batch(tables, lens, capacity=max(capacity, longest))
        tokens = [s.token_ids[-1] for s in seqs] + [self.pad_token_id] * (rows - n)
        tokens = torch.tensor(tokens, dtype=torch.int64, device=self.device)[:, None]  # [Bb, 1]
        if self.decode_fn is not None:
            logits = self.decode_fn(self.lm, tokens, batch)
        else:
            logits = self.lm(tokens, kv_cache=batch).logits[:, -1]  # [Bb, V]
        return logits[:n]

    def prefill(self, seq: Sequence, end: int, all_logits: bool = False) -> torch.Tensor:
        """Run token_ids[num_computed:end] of ``seq``; logits [1, V] of the last one ([T, V] if all_logits)."""
        start = seq.num_computed
        ids = torch.tensor(seq.token_ids[start:end], dtype=torch.int64, device=self.device)[None]  # [1, T]
        batch = self.cache.batch([seq.blocks], [start])
        embeds = self._embeds(seq, ids, start)
        keep = 0 if all_logits else 1
        if embeds is None:
            out = self.lm(ids, kv_cache=batch, logits_to_keep=keep)
        else:
            out = self.lm(inputs_embeds=embeds, kv_cache=batch, logits_to_keep=keep)
        return out.logits[0] if all_logits else out.logits[:, -1]

    def prefill_packed(self, chunks: Seq[tuple[Sequence, int]]) -> torch.Tensor:
        """Run every chunk token_ids[num_computed:end] in one forward; logits [k, V] of each chunk's last token."""
        pieces = [torch.tensor(seq.token_ids[seq.num_computed:end], dtype=torch.int64, device=self.device)[None]
                  for seq, end in chunks]  # [1, T_i] each
        batch = PackedPrefill(self.cache, [seq.blocks for seq, _ in chunks], [seq.num_computed for seq, _ in chunks],
                              [end for _, end in chunks])
        keep = batch.last_token_indices()  # [k]
        embeds = [self._embeds(seq, ids, seq.num_computed) for (seq, _), ids in zip(chunks, pieces)]
        if all(e is None for e in embeds):
            out = self.lm(torch.cat(pieces, dim=1), kv_cache=batch, logits_to_keep=keep)  # [1, T] in
        else:
            embeds = [self.lm.model.embed_tokens(ids) if e is None else e for e, ids in zip(embeds, pieces)]
            out = self.lm(inputs_embeds=torch.cat(embeds, dim=1), kv_cache=batch, logits_to_keep=keep)  # [1, T, C]
        return out.logits[0]  # [k, V]

    # ------------------------------------------------------------------------------------------
    def _embeds(self, seq: Sequence, ids: torch.Tensor, start: int) -> torch.Tensor | None:
        """Embeddings [1, T, C] of the chunk with image features spliced in, or None for a text-only chunk."""
        if self.image_token_id is None:
            return None
        is_image = ids[0] == self.image_token_id  # [T]
        n_image = int(is_image.sum())
        if not n_image:
            return None
        features = self.image_features(seq)
        before = sum(1 for t in seq.token_ids[:start] if t == self.image_token_id)
        if features is None or before + n_image > features.shape[0]:
            total = sum(1 for t in seq.token_ids[:seq.prompt_len] if t == self.image_token_id)
            given = 0 if features is None else features.shape[0]
            raise ValueError(f"the prompt has {total} image tokens (id {self.image_token_id}) but the images give "
                             f"{given} features; send the images with the prompt (the processor expands each "
                             "<image> to its token count).")
        embeds = self.lm.model.embed_tokens(ids)  # [1, T, C]
        embeds[0, is_image] = features[before:before + n_image].to(embeds.dtype)
        return embeds

    def image_features(self, seq: Sequence) -> torch.Tensor | None:
        """All of the request's image features concatenated [N_image_tokens, C], from the cache of recently
        seen images when its digest is there (the vision tower is skipped)."""
        inputs = seq.request.model_inputs
        if inputs.get("pixel_values") is None:
            return None
        digest = seq.request._image_digest
        if digest is not None and digest in self._features:
            self._features.move_to_end(digest)
            self.vision_hits += 1
            return self._features[digest]
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        image_sizes = inputs.get("image_sizes")
        per_image = self.model.get_image_features(pixels, image_sizes, inputs.get("batch_num_images"))
        features = torch.cat(per_image)  # [N_image_tokens, C]
        self.vision_runs += 1
        n_tokens = sum(1 for t in seq.token_ids[:seq.prompt_len] if t == self.image_token_id)
        if n_tokens != features.shape[0]:
            raise ValueError(f"the prompt has {n_tokens} image tokens (id {self.image_token_id}) but the images "
                             f"give {features.shape[0]} features; expand each <image> to num_image_tokens(...) "
                             "tokens (the processor does this).")
        if digest is not None and self.vision_cache_size:
            self._features[digest] = features
            while len(self._features) > self.vision_cache_size:
                self._features.popitem(last=False)
        return features
