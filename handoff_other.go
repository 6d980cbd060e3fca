//go:build !unix

package graceful

import (
	"net"
	"time"
)

// handoff is never made where descriptors cannot be passed: a nil one
// cannot hand off.
type handoff struct{ onControl func(string) }

func (h *handoff) send(string, net.Conn) error { return errNoHandoff }

func (h *handoff) sendEntry(string, net.Conn) error { return errNoHandoff }

func (h *handoff) receive(_ func(string, net.Conn), end func()) { end() }

func (h *handoff) wait() {}

func (h *handoff) setDeadline(time.Time) {}

func (h *handoff) requestDrain() error { return errNoHandoff }

func (h *handoff) sendControl(string, time.Duration) error { return errNoHandoff }

func (h *handoff) setPatience(time.Duration) {}

func (h *handoff) close() {}

func (h *handoff) ended() <-chan struct{} { return nil }

// unmapState: nothing is ever mapped here.
func unmapState([]byte) {}
