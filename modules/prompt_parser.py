"""A1111's ``modules.prompt_parser``: the prompt grammar, over modules/engine/prompt_parser.py."""
from modules.engine.prompt_parser import (  # noqa: F401 - re-exported for extensions
    ScheduledPrompt, get_prompt_schedule, get_learned_conditioning_prompt_schedules, re_AND,
    get_multicond_prompt_list, BREAK_MARKER, re_break, parse_prompt_attention, ExtraNetworkCall,
    parse_extra_networks, parse_extra_networks_prompts, group_extra_networks,
)
