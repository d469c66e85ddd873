"""LP quality as libraries: perplexity on text, the plan sweep (perplexity against decode time), the plan search
and its scoring forward that takes the plan as data.
The command lines over them are `lpjax.eval`, `lpjax.sweep` and `lpjax.plan`."""
