"""Sample messages and expected keys shared by the tests: real-estate on-topic and plain off-topic."""

VIEWING = "Booking, rescheduling or cancelling a property viewing or open house"

ON_TOPIC = [
    "Is the two-bedroom flat on Station Road still available to rent?",
    "Can I book a viewing of the house on Chestnut Avenue next Tuesday?",
    "What documents do I need to apply for a rental?",
    "My landlord hasn't fixed the broken heating yet, can you chase the repair?",
    "How much deposit do I need to buy a home?",
    "I'd like a free valuation of my house before I sell it",
    "When is my rent due each month?",
    "Am I allowed to keep a cat in my rented apartment?",
    "How long does it take from an accepted offer to getting the keys?",
    "What commission do you charge landlords for managing a property?",
]

OFF_TOPIC = [
    "What's the weather forecast for Berlin tomorrow?",
    "Will it snow this weekend?",
    "Give me a recipe for chocolate chip cookies",
    "How long should I boil an egg?",
    "Can you help me solve this quadratic equation for my maths homework?",
    "Write my history essay on the French Revolution",
    "Tell me a joke about penguins",
    "Who won the football match last night?",
    "Translate 'good morning' into Japanese",
    "Recommend a good sci-fi movie to watch tonight",
]

REPORT_KEYS = [
    "auroc",
    "block_rate_at_pass_95",
    "pass_rate_at_leak_5",
    "threshold",
    "pass_rate",
    "block_rate",
    "n_on",
    "n_off",
]
