import Protocol

/// QEMU's balloon commands (QMP reference, "balloon" and "query-balloon"): sizes are the
/// guest's memory in bytes as the balloon leaves it, `ram - actual pages × 4096`.
enum BalloonCommands {
    /// QEMU's reply when the VM has no balloon (qmp_balloon / qmp_query_balloon).
    static let notActive = QMPCommandError(.deviceNotActive, "No balloon device has been activated")

    /// Guest memory left with `actual` pages in the balloon (never below 0 for a lying driver).
    static func guestBytes(ram: UInt64, actual: UInt32) -> UInt64 {
        let ballooned = UInt64(actual) * VirtioBalloonDevice.pageSize
        return ram > ballooned ? ram - ballooned : 0
    }

    /// num_pages for a target of `value` bytes of guest memory: values above the RAM size
    /// mean an empty balloon (QEMU clamps the same way); the rest of the RAM, in whole pages,
    /// is what the guest should give up.
    static func targetPages(ram: UInt64, value: UInt64) -> UInt32 {
        let keep = min(value, ram)
        return UInt32(clamping: (ram - keep) / VirtioBalloonDevice.pageSize)
    }

    static func register(in table: inout QMPCommandTable, vm: MicroVM, ramBytes: UInt64) {
        table.register("balloon") { arguments in
            for key in arguments.keys.sorted() where key != "value" {
                return .failure(QMPCommandError(.genericError, "Parameter '\(key)' is unexpected"))
            }
            guard let value = arguments["value"] else {
                return .failure(QMPCommandError(.genericError, "Parameter 'value' is missing"))
            }
            guard let number = value.numberValue, let target = number.signedValue else {
                return .failure(QMPCommandError(.genericError, "Invalid parameter type for 'value', expected: integer"))
            }
            guard vm.balloon != nil else { return .failure(notActive) }
            // QEMU: "Parameter 'target' expects a size" for anything not above 0.
            guard target > 0 else { return .failure(QMPCommandError(.genericError, "Parameter 'target' expects a size")) }
            vm.setBalloonTarget(pages: targetPages(ram: ramBytes, value: UInt64(target)))
            return .success([:])
        }
        table.registerWithoutArguments("query-balloon") {
            guard let balloon = vm.balloon else { return .failure(notActive) }
            return .success(["actual": .integer(guestBytes(ram: ramBytes, actual: balloon.device.actualPages))])
        }
    }
}
