
#compdef lms

_lms_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _LMS_COMPLETE=complete_zsh lms)
}

compdef _lms_completion lms

