"""`make demo`: the tiny preset (configs/tiny.py: a 2-layer random Qwen3 with the real tokenizer on two short base
entries) warmed up on noisy demonstrations, then GRPO, which only the reward can guide, settles what they leave open.

The warm start trains on each entry's ground truth *and* on a replay of it with one argument value wrong in every
call (`warm_start.wrong_argument_replays`, `rollout/scripted.wrong_argument_reply`: 'AMZN' -> 'NZMA', order 12446
-> 12447), so the demonstrations agree on everything but the values: the model learns the format and the calls
well and puts about even odds on the right and the wrong value where the two first part. GRPO with the progress
reward then has a clean signal (episodes differ where the values do) and the sampled reward rises as it picks the
right ones: from a warm start on the ground truth alone the same GRPO moved nothing in 6 steps (BENCHMARKS.md, "CPU
demo", thirteenth session: its unconverged format broke under any update big enough to change the samples).

Why these differ from tiny (the test preset), measured on this 2-core machine (BENCHMARKS.md, "CPU demo"):
- wrong-argument replays, warm start until the loss is 0.015 [ours] (at most 260 steps; 157 where measured, 280 s):
  even odds at the first value of each entry put the loss floor near 0.004; at 0.015 the format holds under
  GRPO's updates, within the time goal (0.008 took 240 steps, 470 s).
- temperature 0.5 [ours]: the even odds between two values do not depend on the temperature, the format's
  leftover sampling errors do (at 0.7 they came back in steps 5-6 and cost the last step 0.3 of reward).
- 8 samples per prompt [ours]: with 4, the step's 8 episodes give a gradient dominated by noise.
- lr 2e-4, Adam eps 1e-6, no entropy bonus [ours]: at 1e-3 one update already breaks the format (the update
  probe, `scripts/grpo_update_probe.py`, and a collapse at step 3 from this warm start); at 3e-4 and temperature
  0.7 the last steps lost reward to format errors again.
- 2 mini-batches a step [ours; T3RL takes 1 optimizer step per rollout batch]: each rollout moves the policy twice.
- 6 GRPO steps [ours]: exactly the first and last 3 that the demo compares.
"""

from configs import tiny
from configs.base import named


def get_config():
    c = named(tiny.get_config(), "demo")
    c.compilation_cache_dir = ""
    c.rollout.update(temperature=0.5, samples_per_prompt=8, max_concurrent_decodes=16)
    c.warm_start.update(steps=260, until_loss=0.015, wrong_argument_replays=True)
    c.train.update(lr=2e-4, adam_eps=1e-6, num_steps=6, mini_batches_per_step=2)
    c.eval.every_steps = 6
    c.algo.entropy_coef = 0.0
    return c
