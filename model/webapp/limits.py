"""What a request may ask for: its defaults and limits, in the UI and the API alike."""

MAX_SEQUENCES = 5  # sequence boxes in the UI; the API returns one string per box
# The defaults of a request, in the UI and the API alike.
DEFAULT_SEQUENCES = 3
DEFAULT_MAX_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
MAX_NEW_TOKENS = 500  # with MAX_SEQUENCES, bounds one request so it cannot starve the others
MAX_PROMPT_CHARS = 20_000  # longer prompts are cut (keeping the end) before tokenizing
