//go:build !linux

package supervisor

import "context"

// Trampoline does nothing outside Linux.
func Trampoline() {}

func run(context.Context, Config) (int, error) { return 0, ErrNotSupported }
