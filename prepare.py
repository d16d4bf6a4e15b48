"""
Tokenize text into uint16 token files for train.py: data/<name>/{train,val}.bin + meta.json.

Each split is one token stream: the documents' tokens, each document followed by EOS. meta.json records
the tokenizer (with vocab.txt for WordPiece), the special ids and the *format*, i.e. how train.py and
the evaluation cut model_length-token sequences out of the stream, as bd3lms does per dataset:
  plain    consecutive model_length-token chunks, nothing inserted: position 0 is an ordinary token that
           is never masked or scored (OpenWebText: insert_train_special=False in bd3lms' OWT scripts)
  wrapped  consecutive (model_length - 2)-token chunks framed as [BOS] chunk [EOS] (bd3lms' default
           with wrap=True: LM1B, the zero-shot sets)

    python prepare.py                                   # embedded corpus, no download: Python's own docs
    python prepare.py --input=book.txt --name=book      # a text file, or a folder of .txt/.md files
    python prepare.py --dataset=openwebtext             # the paper's OWT, GPT-2, plain (needs `datasets`)
    python prepare.py --dataset=lm1b                    # LM1B as in the paper: bert-base-uncased, wrapped
    python prepare.py --dataset=lm1b-gpt2               # LM1B with GPT-2 tokens (zero-shot evaluation)
"""
import argparse
import ast
import hashlib
import json
import os
import re
import sysconfig

import numpy as np
from tqdm import tqdm

import bd3lm
from bd3lm_tools import checkpoints
from bd3lm_tools.tokenizer import Tokenizer, get_tokenizer

FORMATS = ('plain', 'wrapped')


# --- detokenizers: undo the datasets' tokenized spacing before re-tokenizing (as bd3lms does) ----------

def _apply(rules, text):
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, repl)
    return text


_LM1B = [('http : / / ', 'http://'), ('https : / / ', 'https://'), (re.compile(r" '(\w+)"), r"'\1"),
         (re.compile(r' (\w+) \. '), r' \1. '), (re.compile(r' (\w+) \.$'), r' \1.'), (' ? ', '? '),
         (re.compile(r' \?$'), '?'), (' ! ', '! '), (re.compile(r' !$'), '!'), (' , ', ', '), (' : ', ': '),
         (' ; ', '; '), (' / ', '/'), (re.compile(r'" ([^"]+) "'), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
         (re.compile(r'\( ([^()]+) \)'), r'(\1)'), (re.compile(r'\[ ([^\[\]]+) \]'), r'[\1]'), ('$ ', '$'),
         ('£ ', '£')]
_WIKITEXT = [("s '", "s'"), (re.compile(r"/' [0-9]/"), r"/'[0-9]/"), (' @-@ ', '-'), (' @,@ ', ','), (' @.@ ', '.'),
             (' : ', ': '), (' ; ', '; '), (' . ', '. '), (' ! ', '! '), (' ? ', '? '), (' , ', ', '),
             (re.compile(r'\(\s*([^)]*?)\s*\)'), r'(\1)'), (re.compile(r'\[\s*([^\]]*?)\s*\]'), r'[\1]'),
             (re.compile(r'{\s*([^}]*?)\s*}'), r'{\1}'), (re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),
             (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"), ('= = = =', '===='), ('= = =', '==='), ('= =', '=='),
             (' \N{DEGREE SIGN} ', '\N{DEGREE SIGN}'), (' \n', '\n'), ('\n ', '\n'), (' N ', ' 1 '), (" 's", "'s")]
_PTB = [(" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (' \n ', '\n'), ('\\/', '/')] + [(' N ', ' 1 ')] * 10 + \
       [('$ 1', '$1'), ('# 1', '#1'), ('<unk>', '?')]


def detokenize(name, text):
    if name.startswith('lm1b'):
        return _apply(_LM1B, text)
    if name.startswith('wikitext'):
        return _apply(_WIKITEXT, text)
    if name == 'ptb':
        return _apply(_PTB, text)
    if name == 'lambada':
        return '\n' + text.replace('\N{LEFT DOUBLE QUOTATION MARK}', '"').replace('\N{RIGHT DOUBLE QUOTATION MARK}', '"').strip()
    if name.startswith('scientific_papers'):
        return _apply(_LM1B, _apply(_WIKITEXT, text))
    return text


# name -> (Hugging Face dataset id, config, text field, validation split, tokenizer, format, EOS after each doc).
# The validation split is bd3lms' (dataloader.py): 'test' for LM1B and AG News, 'validation' for the others.
# OWT has no validation split: bd3lms holds out its last 100K documents. LAMBADA is OpenAI's
# lambada_test.jsonl (GPT-2's release), read whole, as bd3lms reads it. The zero-shot sets are scored
# wrapped, without an EOS per document (bd3lms' zero-shot scripts: +data.insert_valid_eos=False).
LAMBADA_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl'
HF_DATASETS = {
    'openwebtext': ('Skylion007/openwebtext', None, 'text', 'last:100000', 'gpt2', 'plain', True),
    'lm1b': ('dvruette/lm1b', None, 'text', 'test', 'bert-base-uncased', 'wrapped', True),
    'lm1b-gpt2': ('dvruette/lm1b', None, 'text', 'test', 'gpt2', 'wrapped', False),
    'wikitext103': ('wikitext', 'wikitext-103-raw-v1', 'text', 'validation', 'gpt2', 'wrapped', False),
    'wikitext2': ('wikitext', 'wikitext-2-raw-v1', 'text', 'validation', 'gpt2', 'wrapped', False),
    'ptb': ('ptb_text_only', None, 'sentence', 'validation', 'gpt2', 'wrapped', False),
    'lambada': (LAMBADA_URL, None, 'text', 'all', 'gpt2', 'wrapped', False),
    'ag_news': ('ag_news', None, 'text', 'test', 'gpt2', 'wrapped', False),
    'scientific_papers_pubmed': ('scientific_papers', 'pubmed', 'article', 'validation', 'gpt2', 'wrapped', False),
    'scientific_papers_arxiv': ('scientific_papers', 'arxiv', 'article', 'validation', 'gpt2', 'wrapped', False),
}


# --- sources ---------------------------------------------------------------------------------------

def python_docs():
    """The embedded corpus: English prose that ships with every Python install, so the demo runs offline
    and nothing third-party is committed. Yields (name, text): the interpreter's documentation topics
    (pydoc_data) and the longer docstrings of the standard library's modules, classes and functions."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f'topic:{name}', topics[name]
    stdlib = sysconfig.get_paths()['stdlib']
    skip = {'test', 'tests', 'site-packages', 'idlelib', 'lib2to3', '__pycache__', 'turtledemo'}
    for root, dirs, files in os.walk(stdlib):  # dirs pruned and sorted in place: deterministic order
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for f in sorted(files):
            if not f.endswith('.py'):
                continue
            path = os.path.join(root, f)
            try:
                with open(path, encoding='utf-8') as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        yield f'{os.path.relpath(path, stdlib)}:{getattr(node, "name", "module")}', doc


def _read_text(path):
    with open(path, 'rb') as f:
        raw = f.read()
    if b'\0' in raw[:8192]:
        raise SystemExit(f'{path} looks like a binary file (it holds NUL bytes), not text; pass .txt/.md files')
    return raw.decode('utf-8', errors='replace')


def local_text(path):
    """Documents of a local file or folder. A folder: one document per .txt/.md file. A single file:
    one document per paragraph (a blank line ends a paragraph), so that it can be split into train and val."""
    if os.path.isfile(path):
        for i, doc in enumerate(re.split(r'\n\s*\n', _read_text(path))):
            if doc.strip():
                yield f'{path}:{i}', doc
        return
    if not os.path.isdir(path):
        raise SystemExit(f'--input={path!r}: no such file or folder')
    names = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(('.txt', '.md')))
    if not names:
        raise SystemExit(f'--input={path!r} holds no .txt or .md files')
    for name in names:
        yield name, _read_text(name)


def hf_dataset(name, splits=('train', 'val')):
    """Yields (name, text, split) for one of HF_DATASETS (online; needs `datasets`)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit(f"--dataset={name} needs the `datasets` package: pip install 'bd3lm[data]'") from None
    repo, config, field, val_split, *_ = HF_DATASETS[name]
    if repo.startswith('https://'):  # a JSON-lines file (LAMBADA): all of it is the validation split
        import urllib.request
        with urllib.request.urlopen(repo) as f:
            for i, line in enumerate(f.read().decode('utf-8').splitlines()):
                if line.strip():
                    yield f'{name}:{i}', detokenize(name, json.loads(line)[field]), 'val'
        return
    if val_split.startswith('last:'):  # hold out the last N documents of the train split
        ds = load_dataset(repo, config, split='train')
        first_val = len(ds) - int(val_split[5:])
        for i, row in enumerate(ds):
            yield f'{name}:{i}', detokenize(name, row[field]), 'val' if i >= first_val else 'train'
        return
    for split, hf_split in (('train', 'train'), ('val', val_split)):
        if split not in splits:
            continue
        for i, row in enumerate(load_dataset(repo, config, split=hf_split)):
            yield f'{name}:{hf_split}:{i}', detokenize(name, row[field]), split


# --- tokenizers -------------------------------------------------------------------------------------

def load_tokenizer(name):
    """'gpt2', 'bert-base-uncased' (its vocab.txt from the Hugging Face hub, online) or a local vocab.txt.
    Returns (tokenizer, vocab list or None)."""
    if name == 'gpt2':
        return get_tokenizer(), None
    path = name
    if name == 'bert-base-uncased':
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise SystemExit("--tokenizer=bert-base-uncased downloads its vocab.txt: pip install 'bd3lm[hub]', or "
                             "pass --tokenizer=PATH/TO/vocab.txt") from None
        path = hf_hub_download('bert-base-uncased', 'vocab.txt')
    if not os.path.isfile(path):
        raise SystemExit(f'--tokenizer={name!r}: expected gpt2, bert-base-uncased or a WordPiece vocab.txt file')
    vocab = checkpoints.read_vocab(path)
    missing = [t for t in ('[MASK]', '[CLS]', '[SEP]', '[UNK]') if t not in vocab]
    if missing:
        raise SystemExit(f'{path}: a BERT WordPiece vocabulary needs {missing}')
    # BOS = EOS = [CLS], as bd3lms computes them (tokenizer.encode(token)[0] starts with [CLS] for BERT): the
    # stream is doc1 [CLS] doc2 [CLS] ... and every wrapped chunk is [CLS] ... [CLS].
    config = bd3lm.BD3LMConfig(vocab_size=len(vocab), tokenizer='wordpiece', mask_id=vocab.index('[MASK]'),
                               bos_id=vocab.index('[CLS]'), eos_id=vocab.index('[CLS]'))
    return Tokenizer(config, vocab), vocab


def model_config_fields(meta):
    """The BD3LMConfig fields a model trained on this data needs: its vocabulary and special tokens.
    GPT-2 appends a mask token after the vocabulary; WordPiece has [MASK] inside it."""
    fields = {k: meta[k] for k in ('tokenizer', 'mask_id', 'bos_id', 'eos_id')}
    fields['vocab_size'] = meta['vocab_size'] + (1 if meta['tokenizer'] == 'gpt2' else 0)
    return fields


# --- writing ----------------------------------------------------------------------------------------

def is_val(name, val_fraction):
    # Deterministic split by document name, stable across runs and machines.
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def write(docs, out_dir, val_fraction, source, total=None, tokenizer='gpt2', fmt='wrapped', eos_per_doc=True,
          splits=('train', 'val')):
    """docs: (name, text) pairs split by a hash of the name, or (name, text, split) triples. splits=('val',)
    writes the validation split alone (zero-shot evaluation needs no train.bin)."""
    if fmt not in FORMATS:
        raise SystemExit(f'--format={fmt!r}: choose one of {FORMATS}')
    if not 0 <= val_fraction < 1:
        raise SystemExit(f'--val_fraction={val_fraction}: must be in [0, 1)')
    enc, vocab = load_tokenizer(tokenizer)
    wanted, splits = splits, {'train': [], 'val': []}
    n_docs = 0
    for doc in tqdm(docs, desc=f'tokenizing {source}', unit='doc', total=total, mininterval=2):
        name, text = doc[:2]
        split = doc[2] if len(doc) == 3 else ('val' if is_val(name, val_fraction) else 'train')
        ids = enc.encode_batch([text])[0] + ([enc.eos_id] if eos_per_doc else [])
        splits[split].append(np.array(ids, dtype=np.uint16))
        n_docs += 1
    if val_fraction > 0 and len(wanted) == 2 and not (splits['train'] and splits['val']):
        # Too few documents for a split by name (one long file, say): hold out the stream's tail instead.
        stream = np.concatenate(splits['train'] + splits['val'])
        cut = int(len(stream) * (1 - val_fraction))
        splits = {'train': [stream[:cut]] if cut > 0 else [], 'val': [stream[cut:]] if cut < len(stream) else []}
    splits = {s: arrays for s, arrays in splits.items() if s in wanted}
    empty = [s for s, arrays in splits.items() if not sum(map(len, arrays))]
    if empty:
        raise SystemExit(f'{source}: the {" and ".join(empty)} split would be empty ({n_docs} document(s)); give more '
                         f'text or a larger --val_fraction')
    os.makedirs(out_dir, exist_ok=True)
    meta = {'source': source, 'tokenizer': 'gpt2' if vocab is None else 'wordpiece',
            'vocab_size': 50257 if vocab is None else len(vocab), 'bos_id': enc.bos_id, 'eos_id': enc.eos_id,
            'mask_id': enc.mask_id, 'format': fmt, 'eos_per_doc': eos_per_doc, 'documents': n_docs}
    if vocab is not None:
        checkpoints.write_vocab(os.path.join(out_dir, 'vocab.txt'), vocab)
    for split, arrays in splits.items():
        tokens = np.concatenate(arrays)
        tmp = os.path.join(out_dir, f'{split}.bin.tmp')
        tokens.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f'{split}.bin'))
        meta[f'{split}_tokens'] = int(len(tokens))
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    print(f'{out_dir}: {meta.get("train_tokens", 0):,} train tokens, {meta["val_tokens"]:,} val tokens, {n_docs:,} documents, '
          f'{meta["tokenizer"]} tokens, {fmt} format')
    return meta


def read_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    with open(path) as f:
        meta = json.load(f)
    if meta.get('format') not in FORMATS:
        raise SystemExit(f'{path} records no sequence format (made by an older prepare.py); run prepare.py again')
    if meta['tokenizer'] == 'wordpiece':
        meta['vocab'] = checkpoints.read_vocab(os.path.join(data_dir, 'vocab.txt'))
    return meta


# --- cutting sequences out of a stream ----------------------------------------------------------------

def frame(pieces, meta):
    """pieces: (B, n) int64 tokens of the stream -> (B, length) sequences in the dataset's format."""
    import torch
    pieces = torch.as_tensor(pieces)
    if meta['format'] == 'plain':
        return pieces
    B = pieces.shape[0]
    return torch.cat([torch.full((B, 1), meta['bos_id']), pieces, torch.full((B, 1), meta['eos_id'])], dim=1)


def piece_length(length, meta):
    return length if meta['format'] == 'plain' else length - 2


def sample_windows(tokens, batch_size, length, meta, generator=None):
    """(batch_size, length) training sequences: random windows of the token stream in the dataset's format."""
    import torch
    n = piece_length(length, meta)
    ix = torch.randint(len(tokens) - n + 1, (batch_size,), generator=generator)
    return frame(np.stack([tokens[i:i + n].astype(np.int64) for i in ix.tolist()]), meta)


def chunks(tokens, length, meta):
    """All consecutive (n_chunks, length) sequences of the stream, as bd3lms evaluates (the remainder is
    dropped)."""
    n = piece_length(length, meta)
    count = len(tokens) // n
    return frame(np.asarray(tokens[:count * n], dtype=np.int64).reshape(count, n), meta)


def prepare_python_docs(data_dir='data', val_fraction=0.05):
    return write(python_docs(), os.path.join(data_dir, 'python_docs'), val_fraction, 'python_docs')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', help='a text file or a folder of .txt/.md files')
    p.add_argument('--dataset', choices=sorted(HF_DATASETS), help='download one of the paper\'s datasets')
    p.add_argument('--name', help='output folder name under --data_dir (default: derived from the source)')
    p.add_argument('--data_dir', default='data')
    p.add_argument('--val_fraction', type=float, default=0.05, help='for --input and the embedded corpus')
    p.add_argument('--tokenizer', help='gpt2, bert-base-uncased or a vocab.txt (default: the dataset\'s; gpt2)')
    p.add_argument('--format', choices=FORMATS, help='how sequences are cut (default: the dataset\'s; wrapped)')
    p.add_argument('--val_only', action='store_true', help='--dataset: write val.bin alone (zero-shot evaluation)')
    args = p.parse_args()
    if args.input and args.dataset:
        raise SystemExit('give --input or --dataset, not both')
    name = args.name or args.dataset or (os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
                                         if args.input else 'python_docs')
    if not name or os.path.basename(name) != name or name in ('.', '..'):
        raise SystemExit(f'--name={name!r} must be a plain folder name (it is created under --data_dir)')
    out = os.path.join(args.data_dir, name)
    if args.dataset:
        _, _, _, _, tokenizer, fmt, eos_per_doc = HF_DATASETS[args.dataset]
        splits = ('val',) if args.val_only else ('train', 'val')
        write(hf_dataset(args.dataset, splits), out, 0.0, args.dataset, tokenizer=args.tokenizer or tokenizer,
              fmt=args.format or fmt, eos_per_doc=eos_per_doc, splits=splits)
    else:
        docs = local_text(args.input) if args.input else python_docs()
        write(docs, out, args.val_fraction, args.input or 'python_docs', tokenizer=args.tokenizer or 'gpt2',
              fmt=args.format or 'wrapped')
