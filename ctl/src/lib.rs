//! haloctl as a library: the command line's parsing and commands.
