# The paper's generative perplexity (Table 3, "1K NFEs"): 25 samples of 1024 tokens (BOS + 1023), nucleus
# 0.9, first-hitting sampling, judged by GPT-2 Large. Needs a GPU, transformers and the hub for the judge.
#   python sample.py config/genppl_owt.py --init_from=kuleshov-group/bd3lm-owt-block_size4
init_from = 'kuleshov-group/bd3lm-owt-block_size4'
num_samples = 25
max_new_tokens = 1023
top_p = 0.9
steps = None
gen_ppl_model = 'gpt2-large'
gen_ppl_stride = 512
out_file = 'genppl.json'
