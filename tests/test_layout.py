"""The layout README promises: bd3lm.py is the method, and the files beside it use its public names only."""
import glob
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_no_file_but_bd3lm_uses_a_private_name_of_bd3lm_the_model_or_its_cache():
    files = [f for pattern in ('*.py', 'bd3lm_tools/*.py', 'benchmarks/*.py', 'notebooks/*.py', 'tests/*.py',
                                'notebooks/*.ipynb')
             for f in glob.glob(os.path.join(ROOT, pattern)) if os.path.basename(f) != 'bd3lm.py']
    private = re.compile(r'\b(bd3lm|model|released|cache|BD3LM)\._[a-z]\w*')
    found = [(os.path.relpath(f, ROOT), m.group(0)) for f in files if not f.endswith('test_layout.py')
             for m in private.finditer(open(f, encoding='utf-8').read())]
    assert not found, found


def test_the_method_file_imports_no_format_tokenizer_or_engine_at_load():
    source = open(os.path.join(ROOT, 'bd3lm.py')).read()
    top_level = [line for line in source.splitlines() if line.startswith(('import ', 'from '))]
    assert all(not re.search(r'\b(checkpoints|tokenizer|engine|serve)\b', line) for line in top_level), top_level


def test_the_method_file_keeps_no_cache_of_its_weights_and_compiles_no_sampler():
    # The model holds nothing keyed on parameter versions (a fused optimizer, load_state_dict(assign=True),
    # functional_call... would leave it stale); the textbook sampler has no torch.compile branch.
    source = open(os.path.join(ROOT, 'bd3lm.py')).read()
    assert '_version' not in source and 'data_ptr' not in source
    sampler = source[source.index('# 7. Sampler'):]
    assert 'torch.compile' not in sampler and 'is_compiling' not in sampler


def test_the_library_modules_import_each_other_one_way():
    # engine <- speculative (it registers its rules with the engine), never the other way: no import cycle
    engine = open(os.path.join(ROOT, 'bd3lm_tools', 'engine.py')).read()
    assert not re.search(r'^\s*(import|from) .*speculative', engine, re.M)
    assert re.search(r'^from bd3lm_tools import engine', open(os.path.join(ROOT, 'bd3lm_tools', 'speculative.py')).read(), re.M)
