package graceful

import (
	"net"
	"net/http"
	"sync/atomic"
	"syscall"
)

// This file and probation_board_unix.go hold the probation's board: what
// each connection the old process handed to a canary is doing, one word
// per connection, in memory both processes map. The old process keeps a
// duplicate of every descriptor it hands to the canary during the window;
// if the canary dies (a panic, SIGKILL, the OOM killer), it serves the
// connections the board says were idle, or that the canary received but
// never registered (so never read), and closes the others, which were
// mid-request. The rule: a request in flight on a process that dies is
// lost; a connection it held idle, or had not started reading, is not.
//
// The invariant that makes a rescue lossless: a slot says idle only while
// nothing has been consumed of the connection since its last response was
// complete. The canary marks it busy right after a Read returns bytes
// (before anything else happens to them), and idle again only when net/http
// reports the connection idle with nothing of the next request read (the
// connection state machine's fresh, without the held byte). TLS and HTTP/2
// connections are never idle on the board: their session lives in the
// canary's memory. A slot is gone once the canary closes the connection or
// starts handing it back: the old process then only closes its duplicate.
// What is left: a Read whose bytes have returned from the kernel and whose
// slot is not yet marked (a few instructions) when the process dies; and,
// as in a hand-over, a pipelining client whose next request net/http read
// with the previous one (see README's limits).

// Slot states.
const (
	slotFree uint32 = iota
	slotIdle        // nothing consumed since the last response was complete
	slotBusy        // bytes read and not yet answered, a hijack, TLS, HTTP/2
	slotGone        // closed by the canary, or being handed back
)

// boardMessage passes the board's file to a new process on probation,
// before it starts.
const boardMessage = "\x00board"

// slottedConn is, in a canary, a connection the old process handed over
// during the window: it keeps the connection's slot on the board.
type slottedConn struct {
	net.Conn
	slot *atomic.Uint32
}

// Read marks the slot busy as soon as bytes are consumed.
func (c *slottedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.slot.CompareAndSwap(slotIdle, slotBusy)
	}
	return n, err
}

// httpState follows net/http's report: idle (with nothing of the next
// request read, plain HTTP/1) or busy.
func (c *slottedConn) httpState(s http.ConnState, restful bool) {
	switch {
	case s == http.StateIdle && restful:
		c.slot.CompareAndSwap(slotBusy, slotIdle)
	case s == http.StateActive || s == http.StateHijacked || s == http.StateIdle:
		c.slot.CompareAndSwap(slotIdle, slotBusy)
	}
}

// handing marks the slot gone before the connection is handed back.
func (c *slottedConn) handing() { c.slot.Store(slotGone) }

// Close sends the FIN a close would: the old process still holds a
// duplicate of the descriptor, so closing ours alone would leave the
// client waiting on a connection nobody serves. Not after a hand-back.
func (c *slottedConn) Close() error {
	if c.slot.Swap(slotGone) != slotGone {
		shutdownWrite(c.Conn)
	}
	return c.Conn.Close()
}

// CloseWrite half-closes, when the connection under it can: the canary is
// done with it (a goodbye, a retirement).
func (c *slottedConn) CloseWrite() error {
	c.slot.Store(slotGone)
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// SyscallConn reaches the descriptor, for a hand-back.
func (c *slottedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	return sc.SyscallConn()
}
