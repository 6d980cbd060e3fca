//go:build !unix

package graceful

import (
	"net"
	"os"
	"time"
)

// Without descriptor passing there is no probation, and no board.
type board struct{}

func (b *board) register(c net.Conn) net.Conn { return c }

type keeper struct{ b *board }

func newKeeper() (*keeper, error) { return nil, ErrNotSupported }

func (k *keeper) send(h *handoff, key string, c net.Conn) error { return h.send(key, c) }

func (k *keeper) forget(net.Conn) {}

func (k *keeper) rescue(func(string, net.Conn)) (int, int) { return 0, 0 }

func (k *keeper) closeAll() {}

func (k *keeper) stop() {}

func (k *keeper) empty() bool { return true }

func processGone(int, time.Duration) bool { return false }

func (k *keeper) pruneEvery(time.Duration, <-chan struct{}) {}

func (p *Process) takeBoard(f *os.File) {}

func shutdownWrite(net.Conn) {}
