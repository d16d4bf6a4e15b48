"""Poor man's configurator (as in nanoGPT). Run as exec(open('configurator.py').read()) from a script
whose settings are module globals:
    python train.py config/owt_bd3lm.py --batch_size=32 --block_size=4
A bare argument is a config file executed over the globals; --key=value overrides one global, the value
parsed as a Python literal when possible (True, 3e-4, None, ...), else taken as a string."""
import sys
from ast import literal_eval

_settings = sorted(k for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None))))
if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
    print((globals().get('__doc__') or '').strip() + '\n\nsettings (--key=value):')
    for _k in _settings:
        print(f'  --{_k}={globals()[_k]!r}')
    if globals().get('_help'):
        print(globals()['_help'])
    raise SystemExit(0)
for _arg in sys.argv[1:]:
    if not _arg.startswith('--'):
        if not _arg.endswith('.py'):
            raise SystemExit(f'unexpected argument {_arg!r}: pass a config file (config/*.py) or --key=value')
        print(f'Overriding config with {_arg}', file=sys.stderr)
        exec(open(_arg).read())
        continue
    if '=' not in _arg:
        raise SystemExit(f'{_arg!r} needs a value: --key=value')
    _key, _val = _arg[2:].split('=', 1)
    if _key not in _settings:
        raise SystemExit(f'unknown setting --{_key}; settings are: {", ".join(_settings)}')
    try:
        _val = literal_eval(_val)
    except (SyntaxError, ValueError):
        pass  # a plain string
    _default = globals()[_key]
    # Settings whose default is None or 'auto' take values of other types (a number, True/False); the
    # script checks those itself. The others keep the default's type (an int is fine for a float).
    if _default is not None and _default != 'auto' and _val is not None and not isinstance(_val, type(_default)) \
            and not (isinstance(_default, float) and isinstance(_val, int)):
        raise SystemExit(f'--{_key}={_val!r}: expected a {type(_default).__name__} like the default {_default!r}')
    print(f'Overriding: {_key} = {_val!r}', file=sys.stderr)
    globals()[_key] = _val
