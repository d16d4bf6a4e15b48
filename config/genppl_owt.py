# The paper's generative perplexity (Table 3, "1K NFEs"), as bd3lms' scripts/gen_ppl ran it: 12 seeds x 25
# samples = 300 samples of 1024 tokens (BOS + 1023), nucleus 0.9 with bd3lms' rule (the token that crosses
# 0.9 is dropped), first-hitting sampling, a sample whose last 256 tokens' unigram entropy falls below 4 at
# any block thrown away and drawn again (up to 10 tries), judged by GPT-2 Large. Table 3 reports
# `gen_ppl_mean`, the mean of the 300 per-sample perplexities; `gen_ppl` is the token-weighted figure.
# Needs a GPU, transformers and the hub for the judge. The 300 rows run as one batch (about 11 GB of KV
# cache in bfloat16 for the 12 x 768 model); on a smaller GPU run --num_samples=25 with 12 seeds.
#   python sample.py config/genppl_owt.py --init_from=kuleshov-group/bd3lm-owt-block_size4
init_from = 'kuleshov-group/bd3lm-owt-block_size4'
num_samples = 300
max_new_tokens = 1023
top_p = 0.9
nucleus = 'bd3lms'
retry_degenerate = True
rule = 'first_hitting'       # the paper's sampler: one token per call, exact
gen_ppl_model = 'gpt2-large'
gen_ppl_stride = 512
out_file = 'genppl.json'
