# The paper's likelihood protocol (Table 2 for OWT, Table 4 zero-shot): the whole validation split in
# consecutive 1024-token chunks, one t per block on [1e-3, 1], antithetic, position 0 unscored.
#   python prepare.py --dataset=openwebtext
#   python train.py config/eval_owt.py --init_from=kuleshov-group/bd3lm-owt-block_size4
# Zero-shot: python prepare.py --dataset=ptb --val_only && python train.py config/eval_owt.py --dataset=ptb
eval_only = True
init_from = 'kuleshov-group/bd3lm-owt-block_size4'
dataset = 'openwebtext'
eval_batch_size = 16
eval_passes = 1
out_dir = 'out-eval'
