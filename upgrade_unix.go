//go:build unix

package graceful

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"
)

// What graceful relies on in tableflip's internals (v1.2.3), all of it in
// this block; TestTableflipInternals fails loudly when an upgrade of
// tableflip changes any of it.
const (
	// tableflipSentinel is the variable with which tableflip tells a child
	// that it has a parent.
	tableflipSentinel = "TABLEFLIP_HAS_PARENT_7DIU3"
	// tableflipPipeWrite and tableflipPipeRead are a child's pipes to its
	// parent. tableflip leaves them inheritable; a subprocess a handler
	// starts must not hold them (the parent would never learn we exited).
	tableflipPipeWrite = 3
	tableflipPipeRead  = 4
	// tableflipParentAlive is the text of Upgrade's refusal while the
	// parent has not exited. tableflip learns of the exit in its own
	// goroutine, a moment after WaitForParent returns, and has no sentinel
	// error for it.
	tableflipParentAlive = "parent hasn't exited"
	// tableflipNotReady is the text of Upgrade's refusal before Ready; it
	// too is returned for a moment after Ready, until tableflip's goroutine
	// has seen it.
	tableflipNotReady = "process is not ready yet"
)

type platform struct {
	upg       *tableflip.Upgrader
	parentPID int // the process that started us, when it is our parent
	// peer is our copy of the successor's end of the hand-off channel,
	// kept until an upgrade succeeds: a child that failed before it read
	// its state message left it there, and the next attempt empties it.
	peer *os.File

	mu        sync.Mutex
	activated []*activatedSocket // sockets from systemd not yet claimed
}

// handoffName names, among the files passed to a new process, the channel
// on which process pid hands connections to its successor. The name
// carries the message format's version: a new process that does not know
// it (an older binary, after a rollback) leaves the channel unclaimed,
// tableflip closes it at Ready, and the old process's sends fail cleanly
// into retiring the connections, instead of arriving garbled.
func handoffName(pid int) string { return "graceful-handoff-v3-" + strconv.Itoa(pid) }

func (p *Process) initPlatform() error {
	acts, err := takeActivated()
	if err != nil {
		return err
	}
	if err := checkParentPipes(p.opts.UpgradeTimeout); err != nil {
		for _, a := range acts {
			a.close()
		}
		return err
	}
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: p.opts.UpgradeTimeout})
	if err != nil {
		for _, a := range acts {
			a.close()
		}
		return fmt.Errorf("graceful: %w", err)
	}
	// tableflip's marker variable and its pipes are ours alone: a
	// subprocess a handler starts must not inherit them.
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "TABLEFLIP_") {
			os.Unsetenv(k)
		}
	}
	p.plat = platform{upg: upg, activated: acts}
	if err := p.openHandoffs(); err != nil {
		p.log.Warn("no connection hand-off; idle connections will be closed at upgrades", "err", err)
	}
	if upg.HasParent() {
		p.plat.parentPID = os.Getppid()
		unix.CloseOnExec(tableflipPipeWrite)
		unix.CloseOnExec(tableflipPipeRead)
	}
	for _, a := range acts {
		p.log.Info("socket activation: received socket", "name", a.name, "addr", a.addr().String())
	}
	return nil
}

// openHandoffs makes the channel to a future successor (its end is passed
// to every child tableflip starts) and takes the parent's, if any.
func (p *Process) openHandoffs() error {
	ours, theirs, err := newHandoffPair(p.log)
	if err != nil {
		return err
	}
	if err := p.plat.upg.Fds.AddFile(handoffName(os.Getpid()), theirs); err != nil {
		theirs.Close()
		ours.close()
		return err
	}
	p.toSuccessor, p.plat.peer = ours, theirs
	if !p.plat.upg.HasParent() {
		return nil
	}
	f, err := p.plat.upg.Fds.File(handoffName(os.Getppid()))
	if err != nil || f == nil {
		return err // a parent without hand-off: nothing to receive
	}
	defer f.Close()
	if p.fromParent, err = handoffFromFile(f, p.log); err != nil {
		return err
	}
	// The parent's record waits for us (the last one: an earlier child
	// that failed may have left its own unread).
	for _, msg := range p.fromParent.takeControl() {
		if body, ok := strings.CutPrefix(msg.text, stateMessage+" "); ok {
			p.inherit(body)
		}
		if msg.text == probationMessage {
			p.canary = newCanary() // the parent judges us before we take over
		}
		if kinds, ok := strings.CutPrefix(msg.text, parentStreamsMessage+" "); ok {
			p.parentTakes(kinds)
		}
		if msg.file != nil {
			if msg.text == stateFileMessage {
				p.receiveState(msg.file)
			}
			if msg.text == boardMessage && p.canary != nil {
				p.takeBoard(msg.file) // mapped: the file may close
			}
			msg.file.Close()
		}
	}
	if err := p.fromParent.sendControl(helloMessage+" "+strconv.Itoa(os.Getpid()), time.Second); err != nil {
		p.log.Warn("cannot tell the previous process our PID", "err", err)
	}
	return nil
}

func (p *Process) hasParent() bool { return p.plat.upg.HasParent() }

func (p *Process) listen(network, addr string) (net.Listener, error) {
	return p.plat.upg.Fds.ListenWithCallback(network, addr, func(network, addr string) (net.Listener, error) {
		if a := p.plat.claim(network, addr, true); a != nil {
			p.log.Info("socket activation: adopted", "network", network, "addr", addr)
			return a.ln, nil
		}
		return bindStream(network, addr)
	})
}

func (p *Process) listenPacket(network, addr string) (net.PacketConn, error) {
	return p.plat.upg.Fds.ListenPacketWithCallback(network, addr, func(network, addr string) (net.PacketConn, error) {
		if a := p.plat.claim(network, addr, false); a != nil {
			p.log.Info("socket activation: adopted", "network", network, "addr", addr)
			return a.pc, nil
		}
		return bindPacket(network, addr)
	})
}

// waitPrevious returns nil once the previous generation has exited, and
// ErrUpgradeInProgress while it still drains: two generations draining at
// once is one too many. While the parent lives it is still our parent; once
// we have been reparented it has exited, and tableflip's WaitForParent
// returns as soon as its goroutine has read the parent's pipe to its end
// (the kernel closed it before reparenting us), so a caller that saw the
// parent exit is never refused.
func (p *Process) waitPrevious() error {
	if !p.hasParent() {
		return nil
	}
	if os.Getppid() == p.plat.parentPID {
		return fmt.Errorf("%w: the previous process is still draining", ErrUpgradeInProgress)
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.UpgradeTimeout)
	defer cancel()
	p.plat.upg.WaitForParent(ctx) // its error is the parent's misbehaviour, not ours
	return nil
}

// awaitPrevious waits, at most until ctx ends, until the previous
// generation has exited and we have been reparented (waitPrevious then lets
// an upgrade start).
func (p *Process) awaitPrevious(ctx context.Context) {
	if !p.hasParent() || os.Getppid() != p.plat.parentPID {
		return
	}
	p.plat.upg.WaitForParent(ctx) // its pipe closes as it exits
	// A multi-threaded parent's children move to us only once its last
	// thread is gone.
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for os.Getppid() == p.plat.parentPID {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// upgrade runs tableflip's Upgrade: the child starts, inherits every
// listener and the hand-off channel, on which state waits for it, and
// declares itself ready or fails. It returns the child's PID if the child
// said it.
func (p *Process) upgrade(state []byte, judged bool) (newPID int, err error) {
	// With a probation a receive loop reads what the new process says.
	loop := p.takesBack()
	if p.toSuccessor != nil {
		// What an earlier child that failed said, and what it left unread.
		if !loop {
			for _, msg := range p.toSuccessor.takeControl() {
				if msg.file != nil {
					msg.file.Close()
				}
			}
		}
		p.reclaim()
		p.lastHello.Store(0)
		p.successorStreams.Store(nil)
		if err := p.toSuccessor.sendControl(stateMessage+" "+string(state), time.Second); err != nil {
			p.log.Warn("cannot pass the upgrade record to the new process", "err", err)
		}
		if judged {
			if err := p.toSuccessor.sendControl(probationMessage, time.Second); err != nil {
				p.log.Warn("cannot put the new process on probation", "err", err)
			}
			if tr := p.trial.Load(); tr != nil && tr.keep != nil {
				if err := p.toSuccessor.sendFile(boardMessage, tr.keep.b.file, time.Second); err != nil {
					p.log.Warn("probation: cannot pass the board; if the new process dies, what it holds dies with it", "err", err)
				}
			}
			if kinds := p.streamKinds(); kinds != "" {
				// Streams that land on the canary come back if it is rolled back.
				if err := p.toSuccessor.sendControl(parentStreamsMessage+" "+kinds, time.Second); err != nil {
					p.log.Warn("cannot tell the new process the streams it may hand back", "err", err)
				}
			}
		}
		p.offerState()
	}
	defer func() {
		if loop {
			newPID = int(p.lastHello.Load())
		} else {
			for _, msg := range p.toSuccessor.takeControl() {
				if pid, ok := strings.CutPrefix(msg.text, helloMessage+" "); ok {
					newPID, _ = strconv.Atoi(pid)
				}
				if kinds, ok := strings.CutPrefix(msg.text, streamsMessage+" "); ok {
					p.successorTakes(kinds)
				}
				if msg.file != nil {
					msg.file.Close()
				}
			}
		}
		if err != nil && p.plat.peer != nil {
			// What the failed process never read (the state file) is not
			// kept until the next attempt.
			p.reclaim()
		}
		if err == nil && p.plat.peer != nil {
			// The successor's end must close with the successor: a send to
			// a successor that died fails at once instead of filling the
			// channel.
			p.plat.peer.Close()
			p.plat.peer = nil
		}
	}()
	for i := 0; ; i++ {
		err := p.plat.upg.Upgrade()
		if err == nil || i == 100 || !tableflipLagging(err) {
			return 0, err
		}
		time.Sleep(time.Millisecond)
	}
}

// reclaim serves here the connections sent to a new process that did not
// read them (it died, or was rolled back): they wait at its end of the
// channel, of which we keep a copy until an upgrade succeeds.
func (p *Process) reclaim() {
	var k *keeper
	if tr := p.trial.Load(); tr != nil {
		k = tr.keep
	}
	p.reclaimKeeping(k)
}

// reclaimKeeping is reclaim during a probation whose duplicates k keeps:
// what comes back unread is served from the descriptor received, and its
// duplicate closed.
func (p *Process) reclaimKeeping(k *keeper) {
	if p.plat.peer == nil {
		return
	}
	deliver := p.inboxes.deliver
	if k != nil {
		deliver = func(key string, c net.Conn) {
			k.forget(c)
			p.inboxes.deliver(key, c)
		}
	}
	n := receiveQueued(p.plat.peer, deliver)
	if n > 0 {
		p.log.Info("connections the new process never read: served here", "conns", n)
	}
}

// tableflipLagging reports whether Upgrade refused only because tableflip's
// goroutine has not yet seen what we know: that we called Ready (the phase
// is Serving), or that the parent exited (waitPrevious saw it).
func tableflipLagging(err error) bool {
	return strings.Contains(err.Error(), tableflipParentAlive) || strings.Contains(err.Error(), tableflipNotReady)
}

// waitParent logs the parent's exit; it returns then or when ctx ends.
func (p *Process) waitParent(ctx context.Context) {
	if !p.hasParent() {
		return
	}
	if err := p.plat.upg.WaitForParent(ctx); ctx.Err() == nil {
		p.log.Info("previous process exited", "err", err)
		// The previous process's last status ("upgraded to pid N; pid M
		// draining") is stale now: the service's status is ours.
		if p.life.get().ready() {
			p.notify(status("serving (pid %d, upgraded)", os.Getpid()))
		}
	}
}

func (p *Process) notifyReady() error {
	p.plat.mu.Lock()
	for _, a := range p.plat.activated {
		p.log.Warn("socket activation: socket not claimed by Listen; closing it", "name", a.name, "addr", a.addr().String())
		a.close()
	}
	p.plat.activated = nil
	p.plat.mu.Unlock()
	return p.plat.upg.Ready()
}

// parentGone reports whether the parent has exited (its pipe to us has
// closed), waiting at most d for it: a Ready that could not reach it says
// the parent died, and then this process is all that serves.
func (p *Process) parentGone(d time.Duration) bool {
	if !p.hasParent() {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	err := p.plat.upg.WaitForParent(ctx)
	return err == nil || ctx.Err() == nil
}

// stopPlatform ends upgrades: one in progress is cancelled (its child is
// killed), and without a successor the Unix socket files are removed. It
// returns once tableflip has done so.
// signalSuccessor sends SIGTERM to the new process the PID file names, when
// it cannot be asked over the hand-off channel (an older version, or no
// channel).
func (p *Process) signalSuccessor() {
	pid := p.successorPID()
	if pid == 0 {
		p.log.Error("no PID file names the new process: it serves on")
		return
	}
	if err := unix.Kill(pid, unix.SIGTERM); err != nil {
		p.log.Error("cannot signal the new process", "pid", pid, "err", err)
	}
}

func (p *Process) stopPlatform() {
	p.plat.upg.Stop()
	<-p.plat.upg.Exit()
}

// checkParentPipes refuses a stray or forged tableflip variable: tableflip
// would read its parent's message from whatever its pipe descriptors are,
// and block forever on a pipe where nothing arrives. A real parent writes
// the names of the descriptors it passes as soon as it has started us, so
// they wait on descriptor 4 before New is called; checkParentPipes waits
// for them at most wait. The caller passes Options.UpgradeTimeout: the
// parent kills a child that is not ready within its own UpgradeTimeout,
// which a new version normally shares, so waiting longer cannot help and a
// shorter bound could refuse a real parent on an overloaded machine.
func checkParentPipes(wait time.Duration) error {
	if os.Getenv(tableflipSentinel) == "" {
		return nil
	}
	for _, fd := range []int{tableflipPipeWrite, tableflipPipeRead} {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
			return fmt.Errorf("graceful: %s is set but descriptor %d is not a pipe from a parent process; refusing to adopt descriptors (unset the variable)", tableflipSentinel, fd)
		}
	}
	// Readable includes POLLHUP: on a closed pipe tableflip fails instead.
	// Each poll lasts at most an hour, so its milliseconds fit any int.
	deadline := time.Now().Add(wait)
	for {
		left := min(max(time.Until(deadline), 0), time.Hour)
		n, err := unix.Poll([]unix.PollFd{{Fd: tableflipPipeRead, Events: unix.POLLIN}}, int((left + time.Millisecond - 1).Milliseconds()))
		switch {
		case err == nil && n > 0:
			return nil
		case err != nil && err != unix.EINTR:
			return fmt.Errorf("graceful: %s is set; waiting for a parent process's message on descriptor %d: %w", tableflipSentinel, tableflipPipeRead, err)
		case time.Now().Before(deadline):
			continue // interrupted by a signal, or an hour passed
		}
		return fmt.Errorf("graceful: %s is set but no parent process sent the names of its descriptors on descriptor %d within %v; refusing to adopt descriptors (unset the variable)", tableflipSentinel, tableflipPipeRead, wait)
	}
}

// offerState writes the state offered (see OfferState) to a new state file
// and sends it to the new process, which reads it at New.
func (p *Process) offerState() {
	p.state.mu.Lock()
	none := len(p.state.offers) == 0
	p.state.mu.Unlock()
	if none {
		return
	}
	start := time.Now()
	f, err := stateFile()
	if err != nil {
		p.log.Error("state not offered: cannot make its file", "err", err)
		return
	}
	defer f.Close()
	n, size, err := p.writeState(f, p.opts.MaxStateSize)
	if err == nil {
		err = sealState(f)
	}
	if err != nil {
		p.log.Error("state not offered: cannot write it", "err", err)
		return
	}
	if err := p.toSuccessor.sendFile(stateFileMessage, f, time.Second); err != nil {
		p.log.Error("state not offered: cannot pass it to the new process", "err", err)
		return
	}
	p.log.Info("state offered to the new process", "payloads", n, "bytes", size, "took", time.Since(start).Round(time.Microsecond))
}

// receiveState reads the state file the parent passed.
func (p *Process) receiveState(f *os.File) {
	start := time.Now()
	got, mapping, err := readState(f, p.opts.MaxStateSize)
	p.state.mu.Lock()
	p.state.received, p.state.mapping = got, mapping
	p.state.mu.Unlock()
	if err != nil {
		p.log.Error("state from the previous process not read; starting cold", "err", err)
		return
	}
	p.log.Info("state received from the previous process", "payloads", len(got), "took", time.Since(start).Round(time.Microsecond))
}
