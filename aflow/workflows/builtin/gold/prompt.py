NOTE = "The gold workflow has no prompts."
