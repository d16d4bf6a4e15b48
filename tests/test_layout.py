"""The layout README promises: bd3lm.py is the method, and the files beside it use its public names only."""
import glob
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_no_file_but_bd3lm_uses_a_private_name_of_bd3lm_the_model_or_its_cache():
    files = [f for pattern in ('*.py', 'benchmarks/*.py', 'notebooks/*.py', 'tests/*.py', 'notebooks/*.ipynb')
             for f in glob.glob(os.path.join(ROOT, pattern)) if os.path.basename(f) != 'bd3lm.py']
    private = re.compile(r'\b(bd3lm|model|released|cache|BD3LM)\._[a-z]\w*')
    found = [(os.path.relpath(f, ROOT), m.group(0)) for f in files if not f.endswith('test_layout.py')
             for m in private.finditer(open(f, encoding='utf-8').read())]
    assert not found, found


def test_the_method_file_imports_no_format_tokenizer_or_engine_at_load():
    source = open(os.path.join(ROOT, 'bd3lm.py')).read()
    top_level = [line for line in source.splitlines() if line.startswith(('import ', 'from '))]
    assert all(not re.search(r'\b(checkpoints|tokenizer|engine|serve)\b', line) for line in top_level), top_level
