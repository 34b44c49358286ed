"""What a request may ask for: its defaults and limits, in the UI and the API alike. The sampling defaults are
SamplingConfig's (one place for the CLI, the API and the app); the app adds its own number of sequences."""

from model.generation.sampling import DEFAULT_SAMPLING

MAX_SEQUENCES = 5  # sequence boxes in the UI; the API returns one string per box
# The defaults of a request, in the UI and the API alike.
DEFAULT_SEQUENCES = 3
DEFAULT_MAX_NEW_TOKENS = DEFAULT_SAMPLING.max_new_tokens
DEFAULT_TEMPERATURE = DEFAULT_SAMPLING.temperature
DEFAULT_TOP_K = DEFAULT_SAMPLING.top_k
DEFAULT_TOP_P = DEFAULT_SAMPLING.top_p
MAX_NEW_TOKENS = 500  # with MAX_SEQUENCES, bounds one request so it cannot starve the others
MAX_PROMPT_CHARS = 20_000  # longer prompts are cut (keeping the end) before tokenizing
