"""The command lines (`python -m kvjax.chat|train|evaluate|convert_fastcache`): flags in, library calls out."""
