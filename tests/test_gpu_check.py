"""benchmarks/gpu_check.py --smoke, as CI runs it: every step of the GPU check at toy size on CPU, so
the script is ready the day a GPU is at hand."""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), '..')
STEPS = ['environment', 'correctness', 'train_speed', 'sample_speed', 'serve_speed']


def test_gpu_check_smoke_runs_every_step(tmp_path):
    out = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--smoke'], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, 'OUT': str(tmp_path)},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [s['name'] for s in report['steps']] == STEPS
    for step in report['steps']:
        assert step['status'] == 'ok', (step['name'], step['status'], step['error'])
        for run in step['result'].get('runs', []):   # Flex training has no CPU backward: CUDA only
            assert run['status'] in ('ok', 'skipped: no cuda'), (step['name'], run)
    checks = [r['name'] for r in report['steps'][1]['result']['runs']]
    assert 'flex_equals_sdpa_bf16' in checks and 'engine_row_equals_generate' in checks
    markdown = (tmp_path / 'gpu_check.md').read_text()
    assert all(f'| {name} | ok |' in markdown for name in STEPS), markdown
