"""The template service: versioned prompt templates, validated and rendered in a sandbox."""
