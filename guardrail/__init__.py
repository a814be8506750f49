"""guardrail: keep business chatbots on topic with a cheap local guard in front of any LLM."""

from guardrail.errors import GuardrailError
from guardrail.guard import Guard, Verdict
from guardrail.scenario import ScenarioDocument, load_scenario, parse_scenario

__all__ = ["Guard", "GuardrailError", "ScenarioDocument", "Verdict", "load_scenario", "parse_scenario"]
__version__ = "0.1.0"
