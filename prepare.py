"""
Tokenize text into uint16 GPT-2 token files for train.py: data/<name>/{train,val}.bin + meta.json.

Format (as in the paper): documents joined into one token stream, each followed by EOS (50256);
train.py cuts training sequences out of the stream and starts each with BOS (also 50256).

    python prepare.py                                   # embedded corpus, no download: Python's own docs
    python prepare.py --input=notes.txt --name=notes    # a text file, or a folder of .txt/.md files
    python prepare.py --dataset=openwebtext             # the paper's data, online, needs `datasets`
    python prepare.py --dataset=lm1b
"""
import argparse
import ast
import hashlib
import json
import os
import sysconfig

import numpy as np
from tqdm import tqdm

import bd3lm

HF_DATASETS = {  # name -> (Hugging Face dataset id, config, text field, validation split or None)
    'openwebtext': ('Skylion007/openwebtext', None, 'text', None),
    'lm1b': ('dvruette/lm1b', None, 'text', 'test'),
    'wikitext103': ('wikitext', 'wikitext-103-raw-v1', 'text', 'validation'),
}


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


def local_text(path):
    if os.path.isfile(path):
        with open(path, encoding='utf-8', errors='replace') as f:
            # a single file: paragraphs separated by blank lines are its documents
            for i, doc in enumerate(f.read().split('\n\n\n')):
                if doc.strip():
                    yield f'{path}:{i}', doc
        return
    if not os.path.isdir(path):
        raise SystemExit(f'--input={path!r}: no such file or folder')
    names = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(('.txt', '.md')))
    if not names:
        raise SystemExit(f'--input={path!r} holds no .txt or .md files')
    for name in names:
        with open(name, encoding='utf-8', errors='replace') as f:
            yield name, f.read()


def hf_dataset(name, split):
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit(f"--dataset={name} needs the `datasets` package: pip install 'bd3lm[data]'") from None
    repo, config, field, val_split = HF_DATASETS[name]
    ds = load_dataset(repo, config, split=val_split if (split == 'val' and val_split) else 'train')
    for i, row in enumerate(ds):
        yield f'{name}:{i}', row[field]


def is_val(name, val_fraction):
    # Deterministic split by document name, stable across runs and machines.
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def write(docs, out_dir, val_fraction, source, total=None):
    enc = bd3lm.get_tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    splits = {'train': [], 'val': []}
    n_docs = 0
    for name, text in tqdm(docs, desc=f'tokenizing {source}', unit='doc', total=total, mininterval=2):
        split = 'val' if is_val(name, val_fraction) else 'train'
        splits[split].append(np.array(enc.encode_ordinary(text) + [bd3lm.EOS_ID], dtype=np.uint16))
        n_docs += 1
    meta = {'source': source, 'tokenizer': 'gpt2', 'vocab_size': 50257, 'eos_id': bd3lm.EOS_ID,
            'bos_id': bd3lm.BOS_ID, 'documents': n_docs}
    for split, arrays in splits.items():
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
        tmp = os.path.join(out_dir, f'{split}.bin.tmp')
        tokens.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f'{split}.bin'))
        meta[f'{split}_tokens'] = int(len(tokens))
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    print(f'{out_dir}: {meta["train_tokens"]:,} train tokens, {meta["val_tokens"]:,} val tokens, {n_docs:,} documents')
    return meta


def sample_windows(tokens, batch_size, length, generator=None):
    """(batch_size, length) training sequences: random windows of the EOS-separated token stream, each
    starting with BOS (the paper's format)."""
    import torch
    ix = torch.randint(len(tokens) - length + 1, (batch_size,), generator=generator)
    x = torch.from_numpy(np.stack([tokens[i:i + length - 1].astype(np.int64) for i in ix.tolist()]))
    return torch.cat([torch.full((batch_size, 1), bd3lm.BOS_ID), x], dim=1)


def prepare_python_docs(data_dir='data', val_fraction=0.05):
    return write(python_docs(), os.path.join(data_dir, 'python_docs'), val_fraction, 'python_docs')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', help='a text file or a folder of .txt/.md files')
    p.add_argument('--dataset', choices=sorted(HF_DATASETS), help='download one of the paper\'s datasets')
    p.add_argument('--name', help='output folder name under --data_dir (default: derived from the source)')
    p.add_argument('--data_dir', default='data')
    p.add_argument('--val_fraction', type=float, default=0.05)
    args = p.parse_args()
    if args.input and args.dataset:
        raise SystemExit('give --input or --dataset, not both')
    if args.dataset:
        name = args.name or args.dataset
        _, _, _, val_split = HF_DATASETS[args.dataset]
        if val_split:  # the dataset has its own validation split: use it as is
            out = os.path.join(args.data_dir, name)
            write(hf_dataset(args.dataset, 'train'), out + '.train', 0.0, args.dataset)
            write(hf_dataset(args.dataset, 'val'), out + '.val', 0.0, args.dataset)
            os.makedirs(out, exist_ok=True)
            os.replace(os.path.join(out + '.train', 'train.bin'), os.path.join(out, 'train.bin'))
            os.replace(os.path.join(out + '.val', 'train.bin'), os.path.join(out, 'val.bin'))
        else:
            write(hf_dataset(args.dataset, 'train'), os.path.join(args.data_dir, name), args.val_fraction, args.dataset)
    elif args.input:
        name = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.input)))[0]
        write(local_text(args.input), os.path.join(args.data_dir, name), args.val_fraction, args.input)
    else:
        prepare_python_docs(args.data_dir, args.val_fraction)
