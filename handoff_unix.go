//go:build unix

package graceful

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// handoff is one end of a hand-off channel (see handoff.go).
type handoff struct {
	conn *net.UnixConn
	log  *slog.Logger
	done chan struct{} // the receive loop ended; nil until receive

	mu      sync.Mutex
	queue   []*outgoing // waiting for a message
	sending bool        // a sender is emptying queue

	// drainRequested, if set before receive, is called when the other end
	// asks this process to drain (see requestDrain).
	drainRequested func()
}

// drainRequest is the message, without descriptor, with which one end asks
// the other to drain. No listener key starts with a NUL byte.
const drainRequest = "\x00drain"

// newHandoffPair makes a hand-off channel: ours, and the other end as a
// file to pass to the other process. Both descriptors are close-on-exec;
// the caller closes theirs once it is passed.
func newHandoffPair(log *slog.Logger) (ours *handoff, theirs *os.File, err error) {
	syscall.ForkLock.RLock() // no fork between creating and marking close-on-exec
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, fmt.Errorf("hand-off socket pair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "handoff")
	defer f.Close() // FileConn keeps a duplicate
	theirs = os.NewFile(uintptr(fds[1]), "handoff-peer")
	ours, err = handoffFromFile(f, log)
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return ours, theirs, nil
}

// handoffFromFile makes a handoff of a channel end passed by another
// process. f stays the caller's to close.
func handoffFromFile(f *os.File, log *slog.Logger) (*handoff, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("hand-off channel: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("hand-off channel: %T is not a Unix socket", c)
	}
	return &handoff{conn: uc, log: log}, nil
}

// maxBatch is how many descriptors one message carries at most (the
// kernel's SCM_MAX_FD is 253).
const maxBatch = 253

// outgoing is one connection waiting in send for the message that carries
// it.
type outgoing struct {
	key  string
	fd   int // valid while its sender waits: nothing closes the connection meanwhile
	done chan error
}

// send passes c's descriptor, and the key of the listener that accepted it,
// to the other end, and returns once it is sent. Our descriptor stays ours
// to close. Concurrent sends are batched, many descriptors to a message: the
// first caller sends for everyone waiting, as a group commit does.
func (h *handoff) send(key string, c net.Conn) error {
	if h == nil {
		return errNoHandoff
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("hand-off: %T has no descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	out := &outgoing{key: key, fd: -1, done: make(chan error, 1)}
	if err := raw.Control(func(fd uintptr) { out.fd = int(fd) }); err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	h.mu.Lock()
	h.queue = append(h.queue, out)
	if !h.sending {
		h.sending = true
		for len(h.queue) > 0 {
			batch := h.queue[:min(len(h.queue), maxBatch)]
			h.queue = h.queue[len(batch):]
			h.mu.Unlock()
			h.sendEach(batch)
			h.mu.Lock()
		}
		h.sending = false
		h.queue = nil
	}
	h.mu.Unlock()
	if err := <-out.done; err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	return nil
}

// sendEach sends batch in one message and tells each sender the outcome.
// If the message is refused for a reason that one descriptor may cause
// (not the deadline, not a peer gone: too many descriptors in flight, a bad
// one), each is sent alone, so that one cannot cost the others.
func (h *handoff) sendEach(batch []*outgoing) {
	err := h.sendBatch(batch)
	if err != nil && len(batch) > 1 && !os.IsTimeout(err) && !errors.Is(err, unix.EPIPE) && !errors.Is(err, unix.ECONNRESET) {
		for _, o := range batch {
			o.done <- h.sendBatch([]*outgoing{o})
		}
		return
	}
	for _, o := range batch {
		o.done <- err
	}
}

// sendBatch sends one message: the keys, NUL-separated, and the descriptors
// in the same order.
func (h *handoff) sendBatch(batch []*outgoing) error {
	var keys []byte
	fds := make([]int, len(batch))
	for i, o := range batch {
		if i > 0 {
			keys = append(keys, 0)
		}
		keys = append(keys, o.key...)
		fds[i] = o.fd
	}
	_, _, err := h.conn.WriteMsgUnix(keys, unix.UnixRights(fds...), nil)
	return err
}

// receive starts delivering the connections the other end sends, until it
// closes its end (it exited) or close is called; then it closes our end and
// calls end. Call it at most once; on a nil handoff it calls end at once.
func (h *handoff) receive(deliver func(key string, c net.Conn), end func()) {
	if h == nil {
		end()
		return
	}
	h.done = make(chan struct{})
	go func() {
		defer close(h.done)
		defer end()
		defer h.conn.Close()
		buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4*maxBatch))
		for {
			n, oobn, flags, _, err := h.conn.ReadMsgUnix(buf, oob)
			if err != nil || n == 0 && oobn == 0 {
				return // the other end is gone, or we close
			}
			if string(buf[:n]) == drainRequest && oobn == 0 {
				if h.drainRequested != nil {
					h.drainRequested()
				}
				continue
			}
			keys := strings.Split(string(buf[:n]), "\x00")
			if flags&(unix.MSG_CTRUNC|unix.MSG_TRUNC) != 0 {
				// Out of descriptors here (the kernel drops those it
				// cannot install) or a message too long: the connections
				// without a descriptor are lost to both processes.
				h.log.Error("connection hand-off: message truncated; connections lost", "keys", len(keys), "flags", flags)
			}
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				// Only a kernel bug makes one; its descriptors cannot be
				// found to close.
				h.log.Error("connection hand-off: malformed message", "err", err)
				continue
			}
			i := 0
			for _, m := range msgs {
				fds, err := unix.ParseUnixRights(&m)
				if err != nil {
					continue
				}
				for _, fd := range fds {
					key := ""
					if i < len(keys) {
						key = keys[i]
					}
					i++
					f := os.NewFile(uintptr(fd), "handed-off")
					c, err := net.FileConn(f)
					f.Close()
					if err != nil {
						h.log.Warn("connection hand-off: unusable descriptor", "err", err)
						continue
					}
					deliver(key, c)
				}
			}
		}
	}()
}

// wait blocks until the receive loop has ended and delivered everything.
func (h *handoff) wait() {
	if h != nil && h.done != nil {
		<-h.done
	}
}

// requestDrain asks the other end to drain, as if it had received a drain
// signal.
func (h *handoff) requestDrain() error {
	if h == nil {
		return errNoHandoff
	}
	_, _, err := h.conn.WriteMsgUnix([]byte(drainRequest), nil, nil)
	return err
}

// setDeadline bounds every send from now on: a peer that does not read by
// then is given up on, and the connection being sent is retired instead.
// The drain sets its own deadline, so that a successor that stalls for less
// (a long GC pause, a starved CPU) costs no connection.
func (h *handoff) setDeadline(t time.Time) {
	if h != nil {
		h.conn.SetWriteDeadline(t)
	}
}

// close closes our end; a receive loop ends.
func (h *handoff) close() {
	if h != nil {
		h.conn.Close()
	}
}
