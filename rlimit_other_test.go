//go:build !unix

package graceful_test

import "errors"

func setNofile(uint64) error { return errors.New("no RLIMIT_NOFILE here") }
