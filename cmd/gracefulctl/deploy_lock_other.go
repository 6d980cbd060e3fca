//go:build !unix

package main

import (
	"context"
	"fmt"
	"io"

	"github.com/graceful-go/graceful"
)

// lock refuses: deploys are serialised by flock(2), and upgrades need unix
// anyway.
func lock(ctx context.Context, path string, stderr io.Writer) (unlock func(), err error) {
	return nil, fmt.Errorf("locking deploys of %s (%s): %w", path, lockName(path), graceful.ErrNotSupported)
}
